"""Can the Hugging Face hub be used now? One quick probe per process, so that a command with no
network fails in a second with a line naming the way out, instead of after the hub client's
~25 s of retries (a warning each).

`hub_offline()` is None when the hub looks reachable, else the reason: HF_HUB_OFFLINE set (as the
hub client honours it), or no TCP connection within a few seconds to the hub's host (HF_ENDPOINT,
default huggingface.co) or to the HTTPS proxy the client would use. `quiet_hub_logger()` holds the
client's own warnings back while it runs (its retries log one each; our error says it once).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import urllib.request
from urllib.parse import urlsplit

HUB_ENDPOINT = "https://huggingface.co"
PROBE_SECONDS = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}   # huggingface_hub's reading of a boolean environment variable


def hub_address() -> tuple[str, int]:
  """(host, port) a hub request connects to: the hub itself, or the proxy the client would use."""
  url = urlsplit(os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT)
  host = url.hostname or "huggingface.co"
  proxy = urllib.request.getproxies().get(url.scheme or "https")
  if proxy and not urllib.request.proxy_bypass(host):
    proxy_url = urlsplit(proxy if "://" in proxy else "http://" + proxy)
    if proxy_url.hostname:
      return proxy_url.hostname, proxy_url.port or 8080
  return host, url.port or (80 if url.scheme == "http" else 443)


@functools.cache
def probe(host: str, port: int) -> str | None:
  """None if a TCP connection to host:port opens within PROBE_SECONDS, else why not. In a thread,
  so a hanging name lookup (which has no timeout of its own) is bounded too; cached per address."""
  outcome = [f"no answer within {PROBE_SECONDS:g}s"]

  def attempt():
    try:
      socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
      outcome[0] = None
    except socket.gaierror:
      outcome[0] = f"cannot resolve {host}"
    except OSError as e:
      outcome[0] = f"cannot connect to {host}:{port} ({e.strerror or type(e).__name__})"

  thread = threading.Thread(target=attempt, daemon=True)
  thread.start()
  thread.join(PROBE_SECONDS + 1.0)
  return outcome[0]


def hub_offline() -> str | None:
  """Why the hub cannot be used now (see the module docstring), else None."""
  if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE:
    return "offline (HF_HUB_OFFLINE is set)"
  reason = probe(*hub_address())
  return None if reason is None else f"no network ({reason})"


@contextlib.contextmanager
def quiet_hub_logger():
  """The hub client's logger at ERROR inside the block. Enter it after the client's functions are
  looked up: loading its modules resets the library's level to WARNING."""
  hub_log = logging.getLogger("huggingface_hub")
  level = hub_log.level
  hub_log.setLevel(logging.ERROR)
  try:
    yield
  finally:
    hub_log.setLevel(level)
