/* vsock-hello PORT: connects to the host (CID 2) on vsock port PORT, sends one line, reads
 * the host's one-line answer and prints it. Built static into the test initramfs by
 * scripts/build-guest-kernel; guest/linux/init runs it when the kernel command line has
 * ringvm.vsock=PORT. A syscall in the nested test guest costs ~0.3 ms, so it makes few. */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    char *end;
    unsigned long port = argc == 2 ? strtoul(argv[1], &end, 10) : 0;
    if (argc != 2 || *end || port == 0 || port > 0xffffffffUL) {
        fprintf(stderr, "usage: vsock-hello PORT\n");
        return 2;
    }
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0) {
        perror("ringvm-guest: vsock socket");
        return 1;
    }
    struct sockaddr_vm addr = {
        .svm_family = AF_VSOCK,
        .svm_cid = VMADDR_CID_HOST,
        .svm_port = (unsigned int)port,
    };
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("ringvm-guest: vsock connect");
        return 1;
    }
    char line[80];
    int n = snprintf(line, sizeof line, "hello from the guest to port %lu\n", port);
    if (write(fd, line, (size_t)n) != n) {
        perror("ringvm-guest: vsock write");
        return 1;
    }
    /* The host answers one line; it may come in pieces. */
    char reply[128];
    size_t got = 0;
    while (got < sizeof reply - 1 && (got == 0 || reply[got - 1] != '\n')) {
        ssize_t r = read(fd, reply + got, sizeof reply - 1 - got);
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    while (got > 0 && reply[got - 1] == '\n')
        got--;
    reply[got] = 0;
    printf("ringvm-guest: vsock reply %s\n", got ? reply : "(none)");
    close(fd);
    return got ? 0 : 1;
}
