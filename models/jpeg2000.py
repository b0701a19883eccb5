"""JPEG 2000 decoding at a reduced resolution level, through OpenJPEG's own C API.

JPEG 2000 is multi-resolution by design: OpenJPEG's ``reduce`` decodes only the wavelet
levels needed for an image 2^r times smaller, which is what a 224 px model wants from a
2,000 px radiograph (~35x faster than a full decode). Neither pylibjpeg-openjpeg nor
pydicom exposes ``reduce``; Pillow does, but its tile bookkeeping rejects reduced sizes that
do not divide evenly (a 1841x1955 radiograph fails at ``reduce`` >= 2). So this module calls
the ``libopenjp2`` that Pillow's wheels ship (or the system's) with ctypes: no compiler, no
extra package, nothing to install beyond ``pip install``. Where no library is found,
:data:`AVAILABLE` is False and callers decode at full size.

The caller bounds the image size (from the codestream's SIZ marker) before calling here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

import numpy as np
import PIL

_J2K, _JP2 = 0, 2  # OPJ_CODEC_FORMAT
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
"""How a JP2 file (a J2K codestream in boxes) starts."""
_EOF = ctypes.c_size_t(-1).value  # what a read callback returns at the end of the stream
THREADS = max(
    1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
)
"""OpenJPEG decodes code-blocks in this many threads (the cores this process may use, up to 4)."""


class _Component(ctypes.Structure):
    """``opj_image_comp_t`` (OpenJPEG 2.3-2.5)."""

    _fields_ = [
        *((name, ctypes.c_uint32) for name in ("dx", "dy", "w", "h", "x0", "y0", "prec", "bpp", "sgnd")),
        ("resno_decoded", ctypes.c_uint32),
        ("factor", ctypes.c_uint32),
        ("data", ctypes.POINTER(ctypes.c_int32)),
        ("alpha", ctypes.c_uint16),
    ]


class _Image(ctypes.Structure):
    """``opj_image_t``."""

    _fields_ = [
        *((name, ctypes.c_uint32) for name in ("x0", "y0", "x1", "y1", "numcomps")),
        ("color_space", ctypes.c_int),
        ("comps", ctypes.POINTER(_Component)),
        ("icc_profile_buf", ctypes.c_void_p),
        ("icc_profile_len", ctypes.c_uint32),
    ]


_READ = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_SKIP = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_SEEK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_void_p)
_PARAMETERS_BYTES = 1 << 16
"""Room for ``opj_dparameters_t`` (~8.3 KB in 2.5); only its first field, ``cp_reduce``, is set
here, the rest by ``opj_set_default_decoder_parameters``."""


def _library() -> ctypes.CDLL | None:
    """Pillow's bundled libopenjp2 (Linux wheels: ``pillow.libs``; macOS: ``PIL/.dylibs``), else
    the system's."""
    package = Path(PIL.__file__).resolve().parent
    bundled = sorted((*package.parent.glob("pillow.libs/libopenjp2*"), *package.glob(".dylibs/libopenjp2*")))
    for candidate in [*map(str, bundled), ctypes.util.find_library("openjp2")]:
        if candidate is None:
            continue
        try:
            lib = ctypes.CDLL(candidate)
            lib.opj_set_decoded_resolution_factor  # noqa: B018  (a 2.x API: probe it)
        except (OSError, AttributeError):
            continue
        void, pointer = ctypes.c_void_p, ctypes.POINTER(_Image)
        signatures: dict[str, tuple[list[object], object]] = {
            "opj_create_decompress": ([ctypes.c_int], void),
            "opj_set_default_decoder_parameters": ([void], None),
            "opj_setup_decoder": ([void, void], ctypes.c_int),
            "opj_codec_set_threads": ([void, ctypes.c_int], ctypes.c_int),
            "opj_stream_create": ([ctypes.c_size_t, ctypes.c_int], void),
            "opj_stream_set_read_function": ([void, void], None),
            "opj_stream_set_skip_function": ([void, void], None),
            "opj_stream_set_seek_function": ([void, void], None),
            "opj_stream_set_user_data_length": ([void, ctypes.c_uint64], None),
            "opj_read_header": ([void, void, ctypes.POINTER(pointer)], ctypes.c_int),
            "opj_decode": ([void, void, pointer], ctypes.c_int),
            "opj_end_decompress": ([void, void], ctypes.c_int),
            "opj_stream_destroy": ([void], None),
            "opj_destroy_codec": ([void], None),
            "opj_image_destroy": ([pointer], None),
        }
        for name, (arguments, result) in signatures.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = arguments, result
        return lib
    return None


_LIB = _library()
AVAILABLE = _LIB is not None
"""Whether a libopenjp2 was found (Pillow's wheels ship one on Linux, macOS and Windows)."""


class _Source:
    """A bytes codestream as an OpenJPEG input stream (read, skip, seek callbacks)."""

    def __init__(self, data: bytes) -> None:
        self.buffer = ctypes.create_string_buffer(data, len(data))
        self.size = len(data)
        self.at = 0
        # Kept as attributes: the C side holds these pointers until the stream is destroyed.
        self.read, self.skip, self.seek = _READ(self._read), _SKIP(self._skip), _SEEK(self._seek)

    def _read(self, target: int, count: int, _user: int) -> int:
        count = min(count, self.size - self.at)
        if count <= 0:
            return _EOF
        ctypes.memmove(target, ctypes.addressof(self.buffer) + self.at, count)
        self.at += count
        return count

    def _skip(self, count: int, _user: int) -> int:
        count = max(-self.at, min(count, self.size - self.at))
        self.at += count
        return count

    def _seek(self, offset: int, _user: int) -> int:
        if not 0 <= offset <= self.size:
            return 0
        self.at = offset
        return 1


def decode(data: bytes, level: int, threads: int = THREADS) -> np.ndarray:
    """Decode the first component of a J2K codestream (or JP2 file) at resolution ``level``:
    each side ``ceil(side / 2**level)``.

    Raises:
        RuntimeError: no libopenjp2, or OpenJPEG refused the codestream.
    """
    lib = _LIB
    if lib is None:
        raise RuntimeError("no libopenjp2 to decode JPEG 2000 with")
    source = _Source(data)
    codec = lib.opj_create_decompress(_JP2 if data.startswith(JP2_SIGNATURE) else _J2K)
    stream = lib.opj_stream_create(1 << 20, 1)
    image = ctypes.POINTER(_Image)()
    try:
        parameters = ctypes.create_string_buffer(_PARAMETERS_BYTES)
        lib.opj_set_default_decoder_parameters(parameters)
        ctypes.c_uint32.from_buffer(parameters, 0).value = level  # cp_reduce
        lib.opj_stream_set_read_function(stream, ctypes.cast(source.read, ctypes.c_void_p))
        lib.opj_stream_set_skip_function(stream, ctypes.cast(source.skip, ctypes.c_void_p))
        lib.opj_stream_set_seek_function(stream, ctypes.cast(source.seek, ctypes.c_void_p))
        lib.opj_stream_set_user_data_length(stream, source.size)
        if not lib.opj_setup_decoder(codec, parameters):
            raise RuntimeError("OpenJPEG refused the decoder settings")
        lib.opj_codec_set_threads(codec, threads)
        if not lib.opj_read_header(stream, codec, ctypes.byref(image)):
            raise RuntimeError("OpenJPEG cannot read the codestream header")
        if not (lib.opj_decode(codec, stream, image) and lib.opj_end_decompress(codec, stream)):
            raise RuntimeError("OpenJPEG cannot decode the codestream")
        component = image.contents.comps[0]
        if not component.data or component.factor != level:
            raise RuntimeError("OpenJPEG returned no pixels at the asked level")
        pixels = np.ctypeslib.as_array(component.data, shape=(component.h, component.w)).copy()
        return pixels
    finally:
        if image:
            lib.opj_image_destroy(image)
        lib.opj_stream_destroy(stream)
        lib.opj_destroy_codec(codec)
