"""A seccomp-BPF filter for the sandbox's untrusted processes (lmtiny.tasks.sandbox_child installs it).

  seccomp.install(own_pid=os.getpid())   # after PR_SET_NO_NEW_PRIVS; lasts for the process's life
  seccomp.ARCH                           # None where this module has no syscall table: no filter

The filter refuses, with EPERM unless noted:
- process creation other than threads: clone without CLONE_THREAD (or with a namespace flag), fork,
  vfork, execve, execveat; clone3 with ENOSYS, so glibc's pthread_create falls back to clone;
- signals to any process but itself: kill, tgkill, rt_(tg)sigqueueinfo with another pid; tkill;
  the kernel's own signals on I/O to an owner it names (fcntl F_SETOWN, F_SETOWN_EX, F_SETSIG;
  ioctl FIOSETOWN, SIOCSPGRP); prlimit64 on another process; setsid and setpgid (a process that
  left the group would outlive the parent's kill of the group);
- reaching other processes: ptrace, process_vm_readv/writev, pidfd_open/send_signal/getfd, kcmp,
  process_madvise, get_robust_list, move_pages, migrate_pages, setpriority and the scheduler's
  and I/O priority setters;
- the kernel's larger attack surfaces: mount and the new mount API, umount2, pivot_root, chroot,
  unshare, setns, bpf, perf_event_open, keyctl/add_key/request_key, io_uring_*, userfaultfd,
  name_to_handle_at/open_by_handle_at, kexec and module loading, fanotify, acct, swap, reboot,
  quotas, personality and the old x86 io/ldt calls;
- sockets: socket and socketpair (the network namespace has only a loopback that is down);
- memory the address-space limit does not count: memfd_create, shmget, msgget (kernel memory a
  process could pile up, file by file or segment by segment, until the host runs out);
- every syscall of another ABI: on x86_64 the x32 numbers (EPERM) and i386's int 0x80 (the filter
  sees a foreign arch and kills the process).
Tables for x86_64 and aarch64 (numbers from the kernel's unistd headers); other machines get no
filter and the sandbox says so.
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_X32_SYSCALL_BIT = 0x40000000
# numbers shared by every architecture since Linux 5.1
_COMMON = {"pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
           "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
           "pidfd_open": 434, "clone3": 435, "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442,
           "quotactl_fd": 443, "memfd_secret": 447}
_TABLES = {
    "x86_64": {"ioctl": 16, "shmget": 29, "socket": 41, "socketpair": 53, "clone": 56, "fork": 57, "vfork": 58,
        "execve": 59, "kill": 62, "msgget": 68, "fcntl": 72, "ptrace": 101, "syslog": 103, "setpgid": 109,
        "setsid": 112, "rt_sigqueueinfo": 129, "uselib": 134, "personality": 135, "ustat": 136, "sysfs": 139,
        "setpriority": 141, "sched_setparam": 142, "sched_setscheduler": 144, "vhangup": 153, "modify_ldt": 154,
        "pivot_root": 155, "chroot": 161, "acct": 163, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168,
        "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173, "init_module": 175,
        "delete_module": 176, "quotactl": 179, "nfsservctl": 180, "tkill": 200, "lookup_dcookie": 212, "tgkill": 234,
        "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "ioprio_set": 251, "migrate_pages": 256,
        "unshare": 272, "get_robust_list": 274, "move_pages": 279, "rt_tgsigqueueinfo": 297, "perf_event_open": 298,
        "fanotify_init": 300, "prlimit64": 302, "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308,
        "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313, "sched_setattr": 314,
        "memfd_create": 319, "kexec_file_load": 320, "bpf": 321, "execveat": 322, "userfaultfd": 323, **_COMMON},
    "aarch64": {"lookup_dcookie": 18, "fcntl": 25, "ioctl": 29, "ioprio_set": 30, "umount2": 39, "mount": 40,
        "pivot_root": 41, "nfsservctl": 42, "chroot": 51, "vhangup": 58, "quotactl": 60, "acct": 89, "personality": 92,
        "unshare": 97, "get_robust_list": 100, "kexec_load": 104, "init_module": 105, "delete_module": 106,
        "syslog": 116, "ptrace": 117, "sched_setparam": 118, "sched_setscheduler": 119, "kill": 129, "tkill": 130,
        "tgkill": 131, "rt_sigqueueinfo": 138, "setpriority": 140, "reboot": 142, "setpgid": 154, "setsid": 157,
        "sethostname": 161, "setdomainname": 162, "msgget": 186, "shmget": 194, "socket": 198, "socketpair": 199,
        "add_key": 217, "request_key": 218, "keyctl": 219, "clone": 220, "execve": 221, "swapon": 224, "swapoff": 225,
        "migrate_pages": 238, "move_pages": 239, "rt_tgsigqueueinfo": 240, "perf_event_open": 241, "prlimit64": 261,
        "fanotify_init": 262, "name_to_handle_at": 264, "open_by_handle_at": 265, "setns": 268, "process_vm_readv": 270,
        "process_vm_writev": 271, "kcmp": 272, "finit_module": 273, "sched_setattr": 274, "memfd_create": 279,
        "bpf": 280, "execveat": 281, "userfaultfd": 282, "kexec_file_load": 294, **_COMMON},
}
ARCH = os.uname().machine if os.uname().machine in _TABLES else None

# refused outright (names missing from an architecture's table, as fork on aarch64, are skipped)
REFUSED = ("fork", "vfork", "execve", "execveat", "tkill", "ptrace", "process_vm_readv", "process_vm_writev",
           "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "kcmp", "process_madvise", "get_robust_list",
           "move_pages", "migrate_pages", "setpriority", "sched_setparam", "sched_setscheduler", "sched_setattr",
           "ioprio_set", "setsid", "setpgid", "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
           "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "bpf",
           "perf_event_open", "keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter",
           "io_uring_register", "userfaultfd", "name_to_handle_at", "open_by_handle_at", "kexec_load",
           "kexec_file_load", "init_module", "finit_module", "delete_module", "fanotify_init", "acct", "swapon",
           "swapoff", "reboot", "quotactl", "quotactl_fd", "lookup_dcookie", "nfsservctl", "sethostname",
           "setdomainname", "syslog", "personality", "uselib", "ustat", "sysfs", "vhangup", "modify_ldt",
           "iopl", "ioperm", "memfd_secret", "socket", "socketpair", "memfd_create", "shmget", "msgget")
_SELF_ONLY = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")  # first argument: the target process
_FCNTL_SIGNALLING = (8, 15, 10)           # F_SETOWN, F_SETOWN_EX, F_SETSIG
_IOCTL_SIGNALLING = (0x8901, 0x8902)      # FIOSETOWN, SIOCSPGRP
CLONE_THREAD = 0x00010000
_CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000

# classic BPF
_LD_ABS, _JEQ, _JGE, _AND, _RET = 0x20, 0x15, 0x35, 0x54, 0x06
_ALLOW, _ERRNO, _KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_NR, _ARCH_OFFSET, _ARG0_LOW, _ARG0_HIGH, _ARG1_LOW = 0, 4, 16, 20, 24  # struct seccomp_data, little-endian
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


def _assemble(lines: list) -> bytes:
  """(code, k, jump-if-true label, jump-if-false label) lines and bare label strings -> sock_filter array."""
  labels, program = {}, []
  for line in lines:
    if isinstance(line, str):
      labels[line] = len(program)
    else:
      program.append(line)
  out = []
  for i, (code, k, jt, jf) in enumerate(program):
    offsets = [labels[j] - i - 1 if isinstance(j, str) else 0 for j in (jt, jf)]
    assert all(0 <= o < 256 for o in offsets), offsets
    out.append(struct.pack("HBBI", code, offsets[0], offsets[1], k))
  return b"".join(out)


def program(own_pid: int, arch: str | None = ARCH, refused: tuple = REFUSED, threads_only: bool = True) -> bytes:
  """The filter for a process whose pid (in its own PID namespace) is `own_pid`."""
  table = _TABLES[arch]
  lines = [(_LD_ABS, _ARCH_OFFSET, None, None), (_JEQ, _AUDIT_ARCH[arch], None, "kill"),
           (_LD_ABS, _NR, None, None)]
  if arch == "x86_64":
    lines.append((_JGE, _X32_SYSCALL_BIT, "eperm", None))
  lines += [(_JEQ, table[name], "eperm", None) for name in refused if name in table]
  if threads_only:
    lines += [(_JEQ, table["clone3"], "enosys", None), (_JEQ, table["clone"], "clone", None)]
    lines += [(_JEQ, table[name], "self", None) for name in _SELF_ONLY]
    lines += [(_JEQ, table["prlimit64"], "prlimit", None), (_JEQ, table["fcntl"], "fcntl", None),
              (_JEQ, table["ioctl"], "ioctl", None)]
  lines += [(_RET, _ALLOW, None, None),
            "clone", (_LD_ABS, _ARG0_LOW, None, None), (_AND, CLONE_THREAD | _CLONE_NAMESPACES, None, None),
            (_JEQ, CLONE_THREAD, "allow", "eperm"),
            "prlimit", (_LD_ABS, _ARG0_LOW, None, None), (_JEQ, 0, "high_zero", "is_self"),
            "self", (_LD_ABS, _ARG0_LOW, None, None),
            "is_self", (_JEQ, own_pid, "high_zero", "eperm"),
            "high_zero", (_LD_ABS, _ARG0_HIGH, None, None), (_JEQ, 0, "allow", "eperm"),
            "fcntl", (_LD_ABS, _ARG1_LOW, None, None), *[(_JEQ, c, "eperm", None) for c in _FCNTL_SIGNALLING],
            (_RET, _ALLOW, None, None),
            "ioctl", (_LD_ABS, _ARG1_LOW, None, None), *[(_JEQ, c, "eperm", None) for c in _IOCTL_SIGNALLING],
            "allow", (_RET, _ALLOW, None, None),
            "eperm", (_RET, _ERRNO | errno.EPERM, None, None),
            "enosys", (_RET, _ERRNO | errno.ENOSYS, None, None),
            "kill", (_RET, _KILL_PROCESS, None, None)]
  return _assemble(lines)


class _Fprog(ctypes.Structure):
  _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def install(own_pid: int, refused: tuple = REFUSED, threads_only: bool = True) -> None:
  """Sets no_new_privs and installs the filter on the calling thread (the process has one thread
  here); raises OSError if the kernel refuses."""
  libc = ctypes.CDLL(None, use_errno=True)
  code = program(own_pid, ARCH, refused, threads_only)
  prog = _Fprog(len(code) // 8, code)
  for args in ((PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), (PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0)):
    if libc.prctl(*(ctypes.c_ulong(a) for a in args)) != 0:
      e = ctypes.get_errno()
      raise OSError(e, f"prctl({args[0]}): {errno.errorcode.get(e, e)}")
