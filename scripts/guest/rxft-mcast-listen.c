/*
 * rxft-mcast-listen IFNAME PORT GROUP...
 *
 * A multicast listener for the test guest, as an mDNS responder is one: it joins each
 * GROUP (IPv4 or IPv6) on IFNAME with IP_ADD_MEMBERSHIP / IPV6_JOIN_GROUP, which makes
 * the guest's NIC program the group into its receive filter, and prints one line per
 * datagram received on PORT:  "rx inet|inet6 SOURCE PAYLOAD".
 *
 * Why a helper at all: busybox has no applet that joins a multicast group from a
 * socket (its nc listens without joining; `ip maddr add` only adds a link-layer entry
 * and the IP layer then drops datagrams for a group no socket joined).
 *
 * Each socket is bound to IFNAME and has IP(V6)_MULTICAST_ALL off, so a listener on
 * one NIC never reports datagrams that arrived on another NIC of the same guest.
 * Built static by scripts/build-guest (the guest has no libc).
 */
#include <arpa/inet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef IPV6_MULTICAST_ALL
#define IPV6_MULTICAST_ALL 29
#endif

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int open_socket(int family, const char *ifname, int port) {
    int fd = socket(family, SOCK_DGRAM, 0), one = 1, zero = 0;
    if (fd < 0) die("socket");
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) die("SO_REUSEADDR");
    if (setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, ifname, strlen(ifname)) < 0)
        die("SO_BINDTODEVICE");
    if (family == AF_INET) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
        if (setsockopt(fd, IPPROTO_IP, IP_MULTICAST_ALL, &zero, sizeof zero) < 0)
            die("IP_MULTICAST_ALL");
        if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind inet");
    } else {
        struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
        if (setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one) < 0) die("V6ONLY");
        if (setsockopt(fd, IPPROTO_IPV6, IPV6_MULTICAST_ALL, &zero, sizeof zero) < 0)
            die("IPV6_MULTICAST_ALL");
        if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind inet6");
    }
    return fd;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s IFNAME PORT GROUP...\n", argv[0]);
        return 2;
    }
    const char *ifname = argv[1];
    int port = atoi(argv[2]);
    unsigned ifindex = if_nametoindex(ifname);
    if (ifindex == 0) die(ifname);
    int fd4 = -1, fd6 = -1;
    for (int i = 3; i < argc; i++) {
        struct in_addr g4;
        struct in6_addr g6;
        if (inet_pton(AF_INET, argv[i], &g4) == 1) {
            if (fd4 < 0) fd4 = open_socket(AF_INET, ifname, port);
            struct ip_mreqn m = {.imr_multiaddr = g4, .imr_ifindex = (int)ifindex};
            if (setsockopt(fd4, IPPROTO_IP, IP_ADD_MEMBERSHIP, &m, sizeof m) < 0)
                die(argv[i]);
        } else if (inet_pton(AF_INET6, argv[i], &g6) == 1) {
            if (fd6 < 0) fd6 = open_socket(AF_INET6, ifname, port);
            struct ipv6_mreq m = {.ipv6mr_multiaddr = g6, .ipv6mr_interface = ifindex};
            if (setsockopt(fd6, IPPROTO_IPV6, IPV6_JOIN_GROUP, &m, sizeof m) < 0)
                die(argv[i]);
        } else {
            fprintf(stderr, "not an address: %s\n", argv[i]);
            return 2;
        }
    }
    printf("joined %s %d\n", ifname, argc - 3);
    fflush(stdout);
    struct pollfd fds[2] = {{.fd = fd4, .events = POLLIN}, {.fd = fd6, .events = POLLIN}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) die("poll");
        for (int i = 0; i < 2; i++) {
            if (!(fds[i].revents & POLLIN)) continue;
            char buf[512], src[INET6_ADDRSTRLEN] = "?";
            struct sockaddr_storage from;
            socklen_t len = sizeof from;
            ssize_t n = recvfrom(fds[i].fd, buf, sizeof buf - 1, 0, (struct sockaddr *)&from,
                                 &len);
            if (n < 0) die("recvfrom");
            buf[n] = 0;
            for (ssize_t j = 0; j < n; j++)
                if (buf[j] == '\n' || buf[j] == '\r') buf[j] = ' ';
            if (from.ss_family == AF_INET)
                inet_ntop(AF_INET, &((struct sockaddr_in *)&from)->sin_addr, src, sizeof src);
            else
                inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&from)->sin6_addr, src, sizeof src);
            printf("rx %s %s %s\n", i == 0 ? "inet" : "inet6", src, buf);
            fflush(stdout);
        }
    }
}
