"""Kernel isolation for the sandbox, through libc with ctypes (lmtiny.tasks.sandbox_child calls it
before any untrusted code runs; standard library only, no root needed where the kernel allows
unprivileged user namespaces).

  enter_namespaces()          # new user, mount, PID, network, IPC, UTS and cgroup namespaces
  build_root(root, binds, work_bytes)  # pivot into a private root: `binds` read-only, a tmpfs at /tmp
  drop_capabilities()         # no capabilities left, in any set, and none to regain

Why our own setup and not bubblewrap or nsjail: the standard library always has it (one
interpreter, no binary to find, version or configure), it costs a few milliseconds, and the same
code runs for root and for an unprivileged user; bwrap is not installed everywhere (it is not on
the machines this was written on) and a dependency on it would make the sandbox a deployment
question. The setup is what bwrap does for `--unshare-all --ro-bind --tmpfs --dev-bind`.
"""
from __future__ import annotations

import ctypes
import errno
import os

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
NAMESPACES = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
# a bind mount's flags that a user namespace may not clear (its "locked" flags): statvfs -> mount
_LOCKED = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
           (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 1, 24, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
SANDBOX_UID = 1000  # who the sandbox's processes are inside their user namespace
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
WORK = "/tmp"       # the only writable directory: cwd, HOME and TMPDIR

_libc = ctypes.CDLL(None, use_errno=True)


class IsolationError(OSError):
  """The kernel refused a step; the message names it."""


def _check(result: int, what: str) -> int:
  if result == -1:
    e = ctypes.get_errno()
    raise IsolationError(e, f"{what}: {os.strerror(e)}")
  return result


def _mount(source, target, fstype, flags, data=None) -> None:
  enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
  _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
         f"mount {source or ''} on {target}")


def _write(path: str, text: str) -> None:
  fd = os.open(path, os.O_WRONLY)
  try:
    os.write(fd, text.encode())
  finally:
    os.close(fd)


def enter_namespaces() -> None:
  """Unshares every namespace at once and maps the caller's uid and gid to SANDBOX_UID (the one
  mapping an unprivileged process may write). The caller keeps its PID; its next child is PID 1
  of the new PID namespace, and the kernel kills every process left there when that one exits."""
  uid, gid = os.getuid(), os.getgid()
  _check(_libc.unshare(ctypes.c_int(NAMESPACES)), "unshare(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWPID|CLONE_NEWNET|...)")
  try:
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{SANDBOX_UID} {uid} 1")
    _write("/proc/self/gid_map", f"{SANDBOX_UID} {gid} 1")
  except OSError as e:
    raise IsolationError(e.errno, f"writing the user namespace's id maps: {e.strerror}") from e
  _check(_libc.sethostname(b"sandbox", 7), "sethostname")


def _locked_flags(path: str) -> int:
  flags = os.statvfs(path).f_flag
  return sum(ms for st, ms in _LOCKED if flags & st)


def _bind_read_only(source: str, target: str) -> None:
  _mount(source, target, None, MS_BIND | MS_REC)
  _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | _locked_flags(target))


def _make_target(root: str, path: str) -> str:
  """An empty directory or file at `path` under `root`, for `path` to be mounted on."""
  target = root + os.path.normpath(path)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  if os.path.isdir(path):
    os.makedirs(target, exist_ok=True)
  elif not os.path.exists(target):
    os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
  return target


def build_root(root: str, binds: list[str], work_bytes: int, hide: tuple[str, ...] = ()) -> None:
  """Makes the empty directory `root` this process's / (the old root unmounted, not reachable):
  a read-only tmpfs holding `binds` (files or directories, read-only, at their own paths), the
  devices in DEVICES, an empty read-only tmpfs over each of `hide` (a directory inside a bind) and
  a tmpfs of `work_bytes` at WORK. No /proc, /sys, /etc or home directory."""
  _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here propagates anywhere
  _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
  for path in binds:
    if os.path.exists(path):
      _bind_read_only(path, _make_target(root, path))
  for path in hide:
    if os.path.isdir(path):
      _mount("tmpfs", root + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,nr_inodes=1")
  for device in DEVICES:
    _mount(device, _make_target(root, device), None, MS_BIND)
  os.makedirs(root + WORK)
  _mount("tmpfs", root + WORK, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
         f"size={max(work_bytes, 4096)},nr_inodes=4096,mode=1777")
  os.chdir(root)
  arch = os.uname().machine
  if arch not in SYS_PIVOT_ROOT:
    raise IsolationError(errno.ENOSYS, f"pivot_root: no syscall number known for {arch}")
  _check(_libc.syscall(ctypes.c_long(SYS_PIVOT_ROOT[arch]), b".", b"."), "pivot_root")
  _check(_libc.umount2(b".", MNT_DETACH), "umount2 of the old root")  # the old root was stacked on "."
  os.chdir("/")
  _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


class _CapHeader(ctypes.Structure):
  _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
  _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> None:
  """Empties the bounding and ambient sets, then the effective, permitted and inheritable sets."""
  cap = 0
  while _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) == 0:  # EINVAL past the last one
    cap += 1
  _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
  _check(_libc.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), (_CapData * 2)()), "capset")


def die_with_parent() -> None:
  """SIGKILL when the parent exits (the kernel, not the parent's code, delivers it)."""
  _libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)


class _PhdrInfo(ctypes.Structure):
  _fields_ = [("addr", ctypes.c_void_p), ("name", ctypes.c_char_p)]  # the head of struct dl_phdr_info


def loaded_libraries() -> list[str]:
  """The shared objects this process has loaded, by the paths the dynamic loader found them at."""
  names = []
  visit = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_PhdrInfo), ctypes.c_size_t, ctypes.c_void_p)(
      lambda info, size, data: names.append(info.contents.name or b"") or 0)
  _libc.dl_iterate_phdr(visit, None)
  return sorted({os.path.normpath(os.fsdecode(n)) for n in names if n.startswith(b"/")})
