"""The libvirt tier: fixtures (libvirt_under_test, libvirt_stack, stack) are in
tests/conftest.py, shared with the mqtt tier's real-guest tests."""
