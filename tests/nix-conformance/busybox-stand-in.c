/* Stand-in for the statically linked busybox that Nix's tests expect as @sandbox_shell@.
 * The tests copy it into the (chroot) store as <hash>-busybox and run it, inside the build
 * sandbox where nothing else exists, as `<hash>-busybox sh -e SCRIPT`. Debian's static
 * multi-call busybox picks its applet from argv[0] and finds none under that name, so this
 * program carries Debian's /usr/bin/busybox inside itself and executes it from a memfd with
 * argv[0] = "busybox" (so busybox takes the applet from argv[1], here "sh"). */
#define _GNU_SOURCE
#include <sys/mman.h>
#include <unistd.h>
#include <stdio.h>

extern const unsigned char bb_start[], bb_end[];
__asm__(".section .rodata\n.global bb_start\n.global bb_end\nbb_start:\n"
        ".incbin \"/usr/bin/busybox\"\nbb_end:\n.previous\n");

int main(int argc, char **argv, char **envp) {
    (void)argc;
    int fd = memfd_create("busybox", MFD_CLOEXEC);
    if (fd < 0) { perror("memfd_create"); return 127; }
    size_t n = bb_end - bb_start, off = 0;
    while (off < n) {
        ssize_t w = write(fd, bb_start + off, n - off);
        if (w <= 0) { perror("write"); return 127; }
        off += w;
    }
    argv[0] = "busybox";
    fexecve(fd, argv, envp);
    perror("fexecve");
    return 127;
}
