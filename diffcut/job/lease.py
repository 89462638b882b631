"""One writer per output: the lease a run holds in its output (``_lease.json``) while it writes.

A run creates the lease atomically before it touches the output's shards
(local disk: a hard link of a complete temporary file, which fails when the
name exists; S3: ``PUT`` with ``If-None-Match: *``), renews it from a
heartbeat thread while it lives (a compare-and-swap: local disk under
``flock`` with a rename, S3 ``PUT`` with ``If-Match`` on the lease's ETag),
and deletes it at the end. A second run finds the lease and refuses at once,
naming the holder (host, pid, run id, since when).

A lease whose holder died frees itself: it is *stale* when it was not renewed
for its ``ttl_seconds`` (measured on the store's clock: the file's mtime
against the local clock, an S3 object's ``Last-Modified`` against the same
response's ``Date``), or at once when its holder ran on this machine (same
host, boot and pid namespace) and that process is gone. A stale lease is
taken over with the same compare-and-swap, so two runs racing for it get one
winner. Docs: docs/reliability.md, "One run per output". Plain Python, no Ray.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from diffcut.job.storage import OutputError, is_remote, open_filesystem, redact

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
#: How long a lease outlives its last renewal: a run that died on another machine blocks the output this long.
LEASE_SECONDS = 120.0
#: Renewals per lease period: a few renewals may fail (a slow store) before the lease runs out.
RENEWALS_PER_PERIOD = 6


#: Tries of reading a lease whole (an S3 body cut off mid-read, a local record still being written).
READ_ATTEMPTS = 4


class LeaseHeld(OutputError):
    """Another run that is alive holds the output's lease."""


# =========================================================================== this process
def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def host_key() -> str | None:
    """This machine and pid namespace (hostname, boot id, pid namespace), where pids can be checked;
    None where /proc does not tell."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return None if boot is None else f"{socket.gethostname()}/{boot}/{namespace}"


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22): with the pid it
    names one process for good; None when there is no such process."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None


def holder_record(run_id: str, ttl: float) -> dict:
    """The lease's content for this process."""
    now = time.time()
    return {
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "host_key": host_key(),
        "process_start": process_start(os.getpid()),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "ttl_seconds": ttl,
        "renewed": now,
        "nonce": uuid.uuid4().hex,
    }


def stale_reason(record: dict, age: float) -> str | None:
    """Why the lease ``record``, last written ``age`` seconds ago, no longer holds, or None (a live holder)."""
    ttl = float(record.get("ttl_seconds", LEASE_SECONDS))
    if age > ttl:
        return f"not renewed for {age:.0f} s (it lasts {ttl:.0f} s)"
    if record.get("host_key") is not None and record.get("host_key") == host_key():
        start = process_start(int(record.get("pid", -1)))
        if start is None or start != record.get("process_start"):
            return f"its process {record.get('pid')} on this machine is gone"
    return None


def describe_holder(output: str, record: dict, age: float) -> str:
    ttl = float(record.get("ttl_seconds", LEASE_SECONDS))
    return (
        f"another run is writing to {output}: run {record.get('run_id')}, pid {record.get('pid')} on host "
        f"{record.get('host')}, since {record.get('since')} (its lease in {LEASE_NAME} was renewed {age:.0f} s "
        f"ago); wait for it to end or stop it, or choose another --output (if that run died, its lease "
        f"expires {max(0.0, ttl - age):.0f} s from now)"
    )


# =========================================================================== stores
class _LocalStore:
    """The lease as a local file: created by ``link`` (fails when the name exists), replaced by ``rename``
    under ``flock`` on the current file, so every read sees a whole record."""

    def __init__(self, root: str):
        self.path = os.path.join(root, LEASE_NAME)

    def read(self) -> tuple[dict, str, float] | None:
        for attempt in range(READ_ATTEMPTS):
            try:
                with open(self.path, "rb") as handle:
                    data, mtime = handle.read(), os.fstat(handle.fileno()).st_mtime
            except FileNotFoundError:
                return None
            try:
                record = _parse(data, self.path)
                break
            except OutputError:  # created without a hard link: its record may still be on its way
                if attempt == READ_ATTEMPTS - 1:
                    raise
                time.sleep(0.1)
        return record, record["nonce"], max(0.0, time.time() - mtime)

    def _write_new(self, record: dict) -> str:
        temporary = f"{self.path}.{record['nonce']}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(json.dumps(record).encode())
            handle.flush()
            os.fsync(handle.fileno())
        return temporary

    def create(self, record: dict) -> str | None:
        temporary = self._write_new(record)
        try:
            os.link(temporary, self.path)
            return record["nonce"]
        except FileExistsError:
            return None
        except OSError:  # no hard links (vfat, some network filesystems): an exclusive create, then the record
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            with open(fd, "wb") as handle:
                handle.write(json.dumps(record).encode())
            return record["nonce"]
        finally:
            os.unlink(temporary)

    def _locked_current(self):
        """An fd of the lease file, locked, that is still the file at the lease's name; None when gone."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return None
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # replaced or removed while waiting for the lock: look again

    def _swap(self, token: str, record: dict | None) -> str | None:
        fd = self._locked_current()
        if fd is None:
            return None
        try:
            with open(fd, "rb", closefd=False) as handle:
                current = _parse(handle.read(), self.path)
            if current.get("nonce") != token:
                return None
            if record is None:
                os.unlink(self.path)
                return token
            os.replace(self._write_new(record), self.path)
            return record["nonce"]
        finally:
            os.close(fd)

    def replace(self, token: str, record: dict) -> str | None:
        return self._swap(token, record)

    def delete(self, token: str) -> bool:
        return self._swap(token, None) is not None


class _S3Store:
    """The lease as an S3 object, written with conditional PUTs; its age on the store's clock."""

    def __init__(self, fs, root: str):
        self.fs = fs
        self.bucket, _, prefix = root.partition("/")
        self.key = f"{prefix.strip('/')}/{LEASE_NAME}".lstrip("/")

    def read(self) -> tuple[dict, str, float] | None:
        from email.utils import parsedate_to_datetime

        from fsspec.asyn import sync

        async def get():
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            return response, await response["Body"].read()

        for attempt in range(READ_ATTEMPTS):
            try:
                response, data = sync(self.fs.loop, get)
                break
            except FileNotFoundError:
                return None
            except PermissionError:
                raise
            except Exception:
                if attempt == READ_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 * 2**attempt)
        record = _parse(data, f"s3://{self.bucket}/{self.key}")
        served = parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
        return record, response["ETag"], max(0.0, (served - response["LastModified"]).total_seconds())

    def _put(self, record: dict, **condition) -> str | None:
        try:
            response = self.fs.call_s3(
                "put_object", Bucket=self.bucket, Key=self.key, Body=json.dumps(record).encode(), **condition
            )
        except FileExistsError:
            return None
        except OSError as error:
            if _failed_condition(error):
                return None
            raise
        return response["ETag"]

    def create(self, record: dict) -> str | None:
        return self._put(record, IfNoneMatch="*")

    def replace(self, token: str, record: dict) -> str | None:
        return self._put(record, IfMatch=token)

    def delete(self, token: str) -> bool:
        # Plain DELETE after checking the ETag: only the lease's holder deletes it, and only a lease
        # left unrenewed for its whole period can change hands in between.
        current = self.read()
        if current is None or current[1] != token:
            return False
        self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)
        return True

    def honours_conditions(self, record: dict) -> bool:
        """Whether a second exclusive create of the existing lease is refused (some stores ignore the header)."""
        return self._put(record, IfNoneMatch="*") is None


def _failed_condition(error: BaseException) -> bool:
    """Whether a storage error is a precondition that did not hold (412) or a concurrent conditional write (409)."""
    cause = error.__cause__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey")


def _parse(data: bytes, where: str) -> dict:
    try:
        record = json.loads(data)
        if isinstance(record, dict) and "nonce" in record:
            return record
    except ValueError:
        pass
    raise OutputError(f"{where} is not a lease this job wrote; remove it if no diffcut run is writing there")


# =========================================================================== the lease
class Lease:
    """The output's lease for run ``run_id``: :meth:`check` (read only), :meth:`acquire`, a heartbeat
    thread that renews it, :meth:`release`. ``on_lost`` is called (from the heartbeat thread) when it
    could not be renewed for its whole period or another run took it over."""

    def __init__(
        self, output: str, run_id: str, *, ttl: float = LEASE_SECONDS, on_lost: Callable[[str], None] | None = None
    ):
        fs, root = open_filesystem(output)
        self.output, self.run_id, self.ttl, self.on_lost = output, run_id, float(ttl), on_lost
        if not is_remote(output):
            self.store = _LocalStore(root)
        elif output.startswith(("s3://", "s3a://")):
            self.store = _S3Store(fs, root)
        else:
            raise OutputError(f"--output {output}: only local folders and s3:// locations can hold the run's lease")
        self.token: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> None:
        """Refuse (:class:`LeaseHeld`) if a live run holds the lease; changes nothing."""
        current = self.store.read()
        if current is not None and stale_reason(current[0], current[2]) is None:
            raise LeaseHeld(describe_holder(self.output, current[0], current[2]))

    def acquire(self) -> None:
        """Take the lease, or a stale one over, and start renewing it; :class:`LeaseHeld` if a live run has it."""
        for _ in range(10):  # each pass either wins, or sees a newer lease than the last one
            record = holder_record(self.run_id, self.ttl)
            token = self.store.create(record) or self._landed(record)
            if token is None:
                current = self.store.read()
                if current is None:
                    continue  # released between the two calls
                previous, previous_token, age = current
                reason = stale_reason(previous, age)
                if reason is None:
                    raise LeaseHeld(describe_holder(self.output, previous, age))
                token = self.store.replace(previous_token, record) or self._landed(record)
                if token is None:
                    continue  # another run took it over first
                log.warning("took over the lease of run %s in %s: %s", previous.get("run_id"), self.output, reason)
            elif isinstance(self.store, _S3Store):
                if not self.store.honours_conditions(record):
                    log.warning(
                        "%s ignores conditional writes (If-None-Match): the lease cannot keep two runs "
                        "started at the same moment apart",
                        self.output,
                    )
                if self._landed(record) is None:
                    continue  # a store whose conditional writes race let another run's record land last
            self.token = token
            self._thread = threading.Thread(target=self._heartbeat, name="diffcut-lease", daemon=True)
            self._thread.start()
            return
        raise OutputError(f"could not take the lease {LEASE_NAME} in {self.output}: it kept changing hands")

    def _heartbeat(self) -> None:
        renewed = time.monotonic()
        while not self._stop.wait(self.ttl / RENEWALS_PER_PERIOD):
            record = holder_record(self.run_id, self.ttl)
            try:
                token = self.store.replace(self.token, record) or self._landed(record)
            except Exception as error:  # noqa: BLE001 - a slow or failing store: try again until the lease runs out
                if time.monotonic() - renewed <= self.ttl:
                    log.warning("renewing the lease in %s failed (retried): %s", self.output, redact(error))
                    continue
                return self._lose(
                    f"the lease in {self.output} could not be renewed for {self.ttl:.0f} s "
                    f"({redact(error)}); another run may take the output over"
                )
            if token is None:
                return self._lose(
                    f"another run took the lease in {self.output} over (this run's renewals "
                    "stalled past its period); this run stopped"
                )
            self.token, renewed = token, time.monotonic()

    def _landed(self, record: dict) -> str | None:
        """The token of ``record`` if a write reported as refused did land: a request retried after its
        first try succeeded (a connection reset) is refused by the condition it had itself satisfied."""
        current = self.store.read()
        return current[1] if current is not None and current[0].get("nonce") == record["nonce"] else None

    def _lose(self, message: str) -> None:
        if self._stop.is_set():  # released meanwhile: a renewal that was still under way says nothing
            return
        self.lost = message
        log.error("%s", message)
        if self.on_lost is not None:
            self.on_lost(message)

    def release(self) -> None:
        """Stop renewing; delete the lease if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl)  # a renewal stuck in a store's retries does not hold the exit
        if self.token is not None and self.lost is None:
            try:
                self.store.delete(self.token)
            except Exception as error:  # noqa: BLE001 - the next run takes the stale lease over
                log.warning("could not remove the lease in %s (it expires): %s", self.output, redact(error))
        self.token = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
