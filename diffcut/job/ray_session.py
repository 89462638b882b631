"""Where the job meets Ray and the operating system: the Ray session, actor devices, stop signals.

:func:`connect_ray` joins a cluster or starts a local one; :class:`StopSignals`
turns SIGTERM/SIGINT into a clean stop (:class:`JobInterrupted`) so that a
stopped run writes its summary and the same command resumes.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading

import ray

from diffcut.method.logs import records_left_out

log = logging.getLogger(__name__)


# =========================================================================== preemption
class JobInterrupted(BaseException):
    """Raised in the driver's main thread by the first SIGTERM/SIGINT of a run.

    A BaseException (like KeyboardInterrupt), so that no ``except Exception``
    on the way up -- in Ray Data's executor or here -- mistakes it for a
    failure of one image or one task.
    """


class StopSignals:
    """SIGTERM and SIGINT end a run cleanly instead of killing the driver mid-write.

    Kubernetes (and Slurm, and spot-instance preemption) sends SIGTERM to the
    driver, waits a grace period, then SIGKILLs everything. The first signal
    raises :class:`JobInterrupted` in the main thread while the job plans or
    runs: Ray Data's executor stops, Ray shuts down (in-flight tasks die;
    their half-written shards have no Parquet footer, are skipped by
    :func:`diffcut.job.schema.read_labels` and deleted by the next run), and the
    job writes a ``_summary.json`` that says it was interrupted. Shards
    already written are complete files and stay valid. Later signals are
    only recorded: the cleanup continues until the orchestrator's SIGKILL.

    Only the main thread can receive signals; from any other thread (tests
    that run the job in a thread) this does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self.armed = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        first = self.received is None
        self.received = self.received or signal.Signals(signum).name
        if first and self.armed:
            self.armed = False
            raise JobInterrupted(self.received)

    def install(self) -> None:
        """(Re)install the handlers; ``ray.init`` replaces the SIGTERM handler with its own."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)
        self.armed = self.received is None

    def restore(self) -> None:
        self.armed = False
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


# =========================================================================== Ray session
def connect_ray(address: str | None, min_cpus: float) -> bool:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or start an embedded one.

    The embedded instance listens on 127.0.0.1 only and has the machine's
    CPU count, raised to ``min_cpus`` (the smallest pools' reservation) so the
    default pools always fit: Ray's CPUs are scheduling slots, not cores.
    Returns whether this call started/joined Ray (and should shut it down).
    An already initialized Ray in this process is used as it is.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return True
    machine = os.cpu_count() or 1
    num_cpus = max(machine, math.ceil(min_cpus))
    if num_cpus > machine:
        log.warning("embedded Ray: %d CPU slots for %d cores, the minimum the pools reserve", num_cpus, machine)
    _use_loopback_node_address()
    with without_token_auth_default_notice():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    return True


def without_token_auth_default_notice():
    """Ray's notice that a new local cluster uses token authentication (its default, kept) left out.

    Ray logs it when ``RAY_AUTH_MODE`` is unset. The setting cannot be stated here instead: Ray reads
    it when imported, and one set later makes the driver and the cluster disagree (the start fails).
    """
    return records_left_out(
        "ray._private.authentication.authentication_token_setup", "Token authentication is enabled for this Ray cluster"
    )


def _use_loopback_node_address() -> None:
    """Make the Ray started next in this process a loopback-only node.

    On Linux, Ray replaces ``_node_ip_address="127.0.0.1"`` by the machine's
    network address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; with a
    network address its servers (GCS, raylet, workers, agents) listen on every
    interface. Ray reads that variable once, when it is imported, which
    happens before any flag is parsed here; so the setting is applied to the
    imported constant as well. Only the embedded start calls this: a driver
    joining a cluster must keep the node's real address.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the processes Ray starts read it at their import
    ray_constants.ENABLE_RAY_CLUSTER = False


def _actor_device(device: str) -> tuple[str, bool]:
    """(device string for the actors, whether they need GPUs)."""
    if device == "auto":
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        return ("cuda" if has_gpu else "cpu"), has_gpu
    return device, device.startswith("cuda")
