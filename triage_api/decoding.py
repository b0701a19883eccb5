"""Decode and gate stored studies: in the worker's thread, or in a pool of spawned processes.

DICOM decoding (JPEG 2000 above all) is CPU-heavy and runs in C code that cannot be
interrupted, so a worker can hand it to :class:`DecodePool`: a few processes, started with
the ``spawn`` method (forking a process that runs torch threads is unsafe), each decoding
one study at a time. A study that takes longer than the time bound, or whose decoder
crashes the process, ends ``failed`` with a reason and its process is replaced; the other
studies of the batch are not held up.

This module imports no torch: a pool process only needs the decoders.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol

import numpy as np
from pydicom.dataset import Dataset

from models.preprocess import (
    MAX_DECODED_BYTES,
    DecodeError,
    Preprocessing,
    age_band,
    decode_dicom,
    gray_from_dicom,
    gray_from_image,
    is_grey,
    open_picture,
    to_input,
)

log = logging.getLogger("triage.decoding")


class NotForModel(Exception):
    """The study is outside the model's intended use; the message says why."""


class _Use(Protocol):
    @property
    def modalities(self) -> tuple[str, ...]: ...
    @property
    def body_parts(self) -> tuple[str, ...]: ...
    @property
    def age_bands(self) -> tuple[str, ...]: ...


class _Card(Protocol):
    @property
    def preprocessing(self) -> Preprocessing: ...
    @property
    def intended_use(self) -> _Use: ...


@dataclass(frozen=True)
class Gate:
    """What decoding needs from a model card; small and picklable without torch."""

    preprocessing: Preprocessing
    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    age_bands: tuple[str, ...] = ()

    @classmethod
    def of(cls, card: _Card) -> Gate:
        """The gate of a :class:`models.bundle.ModelCard`."""
        use = card.intended_use
        return cls(card.preprocessing, tuple(use.modalities), tuple(use.body_parts), tuple(use.age_bands))


@dataclass(frozen=True)
class DecodeTask:
    """One stored study to decode: its blob file and whether it is DICOM (else PNG/JPEG)."""

    path: str
    dicom: bool
    gate: Gate
    max_decoded_bytes: int = MAX_DECODED_BYTES
    """The site's bound on a decoded image, checked again on the codestream before decoding."""


@dataclass(frozen=True)
class Decoded:
    """A study's ``(3, S, S)`` model input, or the reason there is none."""

    status: Literal["ok", "not_analyzed", "failed"]
    pixels: np.ndarray | None = None
    reason: str | None = None


DecodeFn = Callable[[DecodeTask], Decoded]


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value).strip() or None if value is not None else None


def model_input(data: bytes, dicom: bool, gate: Gate, max_bytes: int = MAX_DECODED_BYTES) -> np.ndarray:
    """Decode and gate a stored study, and return the ``(3, S, S)`` model input.

    The pixels are decoded at the resolution the model needs, as
    :func:`models.preprocess.decode_gray` (the trainer's) decodes them, and before the
    header is gated, so that a broken file ends ``failed`` whatever its body part.

    Args:
        data: the stored bytes.
        dicom: DICOM Part 10 (else a PNG/JPEG picture).
        gate: the model's preprocessing and intended use.
        max_bytes: bound on the full-size decoded image.

    Raises:
        NotForModel: the header (or picture) says the model is not for this study.
        DecodeError: the pixels cannot be decoded.
    """
    pre = gate.preprocessing
    if not dicom:
        image = open_picture(data, min_side=pre.input_size, max_bytes=max_bytes)
        if not is_grey(image):
            raise NotForModel("colour picture; the model reads greyscale radiographs")
        return to_input(gray_from_image(image, pre), pre)

    ds, pixels = decode_dicom(data, min_side=pre.input_size, max_bytes=max_bytes)
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality not in gate.modalities:
        raise NotForModel(f"modality {modality or 'missing'} is outside the model's intended use")
    body_part = str(ds.get("BodyPartExamined", "")).strip().upper()
    if body_part not in gate.body_parts:
        raise NotForModel(f"body part {body_part or 'missing'} is outside the model's intended use")
    if gate.age_bands:
        band = age_band(*(_text(ds, k) for k in ("PatientAge", "PatientBirthDate", "StudyDate")))
        if band is not None and band not in gate.age_bands:
            allowed = ", ".join(gate.age_bands)
            raise NotForModel(f"age band {band} is outside the model's intended population ({allowed})")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise NotForModel("multi-frame image; the model reads single radiographs")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise NotForModel("colour image; the model reads greyscale radiographs")
    try:
        gray = gray_from_dicom(ds, pixels, pre)
    except (ValueError, TypeError) as exc:
        raise DecodeError(f"cannot window DICOM pixels ({type(exc).__name__})") from None
    return to_input(gray, pre)


def decode_study(task: DecodeTask) -> Decoded:
    """Read a blob and turn it into model input; never raises for bad pixels.

    The one decoding path, whether it runs in the worker's thread or in a pool process.
    """
    try:
        data = Path(task.path).read_bytes()
        return Decoded("ok", pixels=model_input(data, task.dicom, task.gate, task.max_decoded_bytes))
    except NotForModel as exc:
        return Decoded("not_analyzed", reason=str(exc))
    except DecodeError as exc:
        return Decoded("failed", reason=str(exc))


_READY = "ready"
STARTUP_SECONDS = 120.0
"""How long a new decode process may take to import its decoders (a loaded machine is slow)."""


def _serve(connection: Connection, decode: DecodeFn) -> None:
    """A pool process: decode tasks from the pipe until it closes (the worker exited)."""
    from triage_api.ingest import quiet_pydicom

    # Ctrl-C reaches the whole process group; the worker decides when its pool stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet_pydicom()
    try:
        connection.send(_READY)  # imports are done: the time bound starts counting from here
    except (BrokenPipeError, OSError):
        return
    while True:
        try:
            task = connection.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            result = decode(task)
        except Exception as exc:  # a decode function that raises must not kill the process
            result = Decoded("failed", reason=f"cannot decode study ({type(exc).__name__})")
        try:
            connection.send(result)
        except (BrokenPipeError, OSError):
            return


class _Slot:
    """One pool process and the worker's end of its pipe."""

    def __init__(self, context: multiprocessing.context.SpawnContext, decode: DecodeFn) -> None:
        self.connection, child = context.Pipe(duplex=True)
        self.process: BaseProcess = context.Process(
            target=_serve, args=(child, decode), name="triage-decode", daemon=True
        )
        self.process.start()
        child.close()  # the process holds its end; if the worker dies, the process sees EOF
        self.ready = False

    def wait_ready(self) -> bool:
        """Block until the process has started (its start-up is not a study's decode time).

        Returns:
            False if it died or did not start within :data:`STARTUP_SECONDS`.
        """
        if not self.ready:
            try:
                self.ready = self.connection.poll(STARTUP_SECONDS) and self.connection.recv() == _READY
            except (EOFError, OSError):
                self.ready = False
        return self.ready

    def stop(self, *, kill: bool) -> None:
        if not kill:
            try:
                self.connection.send(None)
            except (BrokenPipeError, OSError):
                kill = True
        if kill:
            self.process.kill()
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)
        self.connection.close()


class DecodePool:
    """Processes that decode studies in parallel, each study under a time bound.

    Not thread-safe: one thread calls :meth:`map` at a time.

    Args:
        workers: how many processes.
        timeout: seconds one study may take; beyond it the study fails and its process
            is killed and replaced.
        decode: the function a process runs per task (a module-level function, so that
            it can be named to a spawned process); :func:`decode_study` outside tests.
    """

    def __init__(self, workers: int, timeout: float, decode: DecodeFn = decode_study) -> None:
        if workers < 1:
            raise ValueError("a decode pool needs at least one process")
        if timeout <= 0:
            raise ValueError("the decode time bound must be positive")
        self.timeout = timeout
        self._decode = decode
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(self._context, decode) for _ in range(workers)]
        self._closed = False

    @property
    def pids(self) -> list[int]:
        """Process ids of the pool, for health checks and tests."""
        return [slot.process.pid for slot in self._slots if slot.process.pid is not None]

    def map(self, tasks: list[DecodeTask]) -> list[Decoded]:
        """Decode ``tasks`` in parallel; results in the order of ``tasks``. Never raises for a study.

        Raises:
            RuntimeError: the pool was closed, or a new process could not start (the
                worker's iteration fails and its claims go back to the queue with their lease).
        """
        if self._closed:
            raise RuntimeError("the decode pool is closed")
        results: list[Decoded | None] = [None] * len(tasks)
        queue = deque(enumerate(tasks))
        idle = list(self._slots)
        busy: dict[int, tuple[_Slot, int, float]] = {}  # id(connection) -> (slot, index, started)
        try:
            while queue or busy:
                while queue and idle:
                    slot = idle.pop()
                    if not slot.wait_ready():
                        self._replace(slot, kill=True)
                        raise RuntimeError("a decode process did not start")
                    index, task = queue.popleft()
                    try:
                        slot.connection.send(task)
                    except (BrokenPipeError, OSError):  # the process died while idle
                        idle.append(self._replace(slot, kill=True))
                        queue.appendleft((index, task))
                        continue
                    busy[id(slot.connection)] = (slot, index, time.monotonic())
                first_deadline = min(started for _, _, started in busy.values()) + self.timeout
                ready = wait(
                    [slot.connection for slot, _, _ in busy.values()],
                    timeout=max(0.0, first_deadline - time.monotonic()),
                )
                for connection in ready:
                    slot, index, _ = busy.pop(id(connection))
                    try:
                        results[index] = slot.connection.recv()
                        idle.append(slot)
                    except (EOFError, OSError):
                        # A decoder crashed the process (a segfault in C code, the OOM killer).
                        results[index] = Decoded("failed", reason="the decoder process died on this study")
                        idle.append(self._replace(slot, kill=True))
                now = time.monotonic()
                for key, (slot, index, started) in list(busy.items()):
                    if now - started >= self.timeout:
                        del busy[key]
                        results[index] = Decoded(
                            "failed", reason=f"decoding took longer than {self.timeout:g} s"
                        )
                        idle.append(self._replace(slot, kill=True))
        finally:
            # Never leave a process working on an abandoned task: its late answer would be
            # taken for another study's. (Only reached with tasks in flight on an error.)
            for slot, _, _ in busy.values():
                slot.stop(kill=True)
        return [result for result in results if result is not None]

    def _replace(self, slot: _Slot, *, kill: bool) -> _Slot:
        slot.stop(kill=kill)
        fresh = _Slot(self._context, self._decode)
        self._slots[self._slots.index(slot)] = fresh
        log.warning("decode process %s replaced by %s", slot.process.pid, fresh.process.pid)
        return fresh

    def close(self) -> None:
        """Stop every process (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for slot in self._slots:
            slot.stop(kill=False)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
