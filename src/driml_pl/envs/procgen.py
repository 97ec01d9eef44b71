"""The Procgen backend: procgen's C library (``libenv.so``, `driml_pl.procgen_build`) driven through cffi's ABI mode.

Procgen's games live in a plain C library with gym3's ``libenv`` interface: ``libenv_make`` builds N envs from named
options, ``libenv_set_buffers`` hands it the arrays it writes observations, rewards and episode starts into (and
reads actions from), ``libenv_act`` starts a step on procgen's own threads and ``libenv_observe`` waits for it. This
file declares that interface itself and calls it with numpy arrays, so neither the ``procgen`` Python module nor gym3
nor gym is imported: the same code runs on Python 3.10 to 3.14 with numpy 1 or 2, and loads whichever build
``data.env.build`` names. The options are the ones procgen 0.10.7's ``ProcgenGym3Env`` passes, with its defaults,
so frames, rewards, episode starts and emulator states equal that wrapper's bit for bit
(`tests/test_procgen_pixels.py` against the recorded original build).
"""

from __future__ import annotations

import gc
import re
import threading
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from driml_pl.types import EnvSpec

if TYPE_CHECKING:
    from driml_pl.envs import EnvConfig

# procgen's keyboard combinations, in its action order (procgen/env.py `get_combos`): every game takes all 15
ACTIONS = ("LEFT+DOWN", "LEFT", "LEFT+UP", "DOWN", "NOOP", "UP", "RIGHT+DOWN", "RIGHT", "RIGHT+UP",
           "D", "A", "W", "S", "Q", "E")  # fmt: skip
SPEC = EnvSpec(frame_shape=(64, 64, 3), actions=ACTIONS)
DISTRIBUTION_MODE_IDS = {"easy": 0, "hard": 1, "extreme": 2, "memory": 10}  # procgen's game.h DistributionMode
# procgen's "exploration" mode: hard levels, one fixed level per game that has one (procgen/env.py)
EXPLORATION_LEVELS = {"coinrun": 1949448038, "caveflyer": 1259048185, "leaper": 1318677581, "jumper": 1434825276,
                      "maze": 158988835, "heist": 876640971, "climber": 1561126160, "ninja": 1123500215}  # fmt: skip
MAX_STATE_BYTES = 2**20  # procgen's MAX_STATE_SIZE: the buffer one env's serialised state is read into
LIBENV_VERSION = 1

# The part of gym3's libenv.h that a caller needs (its ABI, version 1), and procgen's two state functions.
CDEF = """
typedef void libenv_env;
enum libenv_dtype { LIBENV_DTYPE_UNUSED = 0, LIBENV_DTYPE_UINT8 = 1, LIBENV_DTYPE_INT32 = 2, LIBENV_DTYPE_FLOAT32 = 3 };
union libenv_value { uint8_t uint8; int32_t int32; float float32; };
enum libenv_scalar_type { LIBENV_SCALAR_TYPE_UNUSED = 0, LIBENV_SCALAR_TYPE_REAL = 1, LIBENV_SCALAR_TYPE_DISCRETE = 2 };
enum libenv_space_name { LIBENV_SPACE_UNUSED = 0, LIBENV_SPACE_OBSERVATION = 1, LIBENV_SPACE_ACTION = 2,
                         LIBENV_SPACE_INFO = 3 };
struct libenv_tensortype {
    char name[128]; enum libenv_scalar_type scalar_type; enum libenv_dtype dtype; int shape[16]; int ndim;
    union libenv_value low; union libenv_value high;
};
struct libenv_option { char name[128]; enum libenv_dtype dtype; int count; void *data; };
struct libenv_options { struct libenv_option *items; int count; };
struct libenv_buffers { void **ob; float *rew; uint8_t *first; void **info; void **ac; };
int libenv_version();
libenv_env *libenv_make(int num, const struct libenv_options options);
int libenv_get_tensortypes(libenv_env *handle, enum libenv_space_name name, struct libenv_tensortype *types);
void libenv_set_buffers(libenv_env *handle, struct libenv_buffers *bufs);
void libenv_observe(libenv_env *handle);
void libenv_act(libenv_env *handle);
void libenv_close(libenv_env *handle);
int get_state(libenv_env *, int, char *, int);
void set_state(libenv_env *, int, char *, int);
"""
_DTYPES: dict[int, np.dtype] = {1: np.dtype(np.uint8), 2: np.dtype(np.int32), 3: np.dtype(np.float32)}

_LOCK = threading.Lock()
_FFI: Any = None
_LIBRARIES: dict[str, Any] = {}  # one dlopen per library path and process (procgen keeps global state per library)


def _library(path: str) -> tuple[Any, Any]:
    """cffi's FFI and the opened library at ``path`` (opened once per process)."""
    global _FFI
    with _LOCK:
        if _FFI is None:
            import cffi

            _FFI = cffi.FFI()
            _FFI.cdef(CDEF)
        if path not in _LIBRARIES:
            # RTLD_DEEPBIND: the library's statically linked Qt resolves its own symbols first, not the process's
            flags = _FFI.RTLD_NOW | _FFI.RTLD_LOCAL | getattr(_FFI, "RTLD_DEEPBIND", 0)
            try:
                lib = _FFI.dlopen(path, flags)
            except OSError as err:
                raise _unloadable(path, err) from None
            if lib.libenv_version() != LIBENV_VERSION:
                raise RuntimeError(f"{path}: libenv version {lib.libenv_version()}, expected {LIBENV_VERSION}")
            _LIBRARIES[path] = lib
        return _FFI, _LIBRARIES[path]


def _unloadable(path: str, err: OSError) -> Exception:
    """One line for a library the system cannot load: most often a system library it links that is missing."""
    from driml_pl.procgen_build import BuildUnavailable

    missing = re.search(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object file", str(err))
    if missing is None:
        return BuildUnavailable(f"cannot load Procgen's library {path}: {' '.join(str(err).split())}")
    name = missing.group(1)
    hint = SYSTEM_LIBRARIES.get(name.split(".so")[0], "the package that provides it")
    return BuildUnavailable(f"Procgen's library {path} needs {name}, which this system lacks: install {hint}")


# what procgen 0.10.7's libenv.so links beyond libc, and where a Debian or Ubuntu system gets it
_GLIB = "glib (Debian/Ubuntu: apt install libglib2.0-0t64, or libglib2.0-0 before Debian 13 and Ubuntu 24.04)"
SYSTEM_LIBRARIES = {
    "libglib-2.0": _GLIB,
    "libgthread-2.0": _GLIB,
    "libpcre2-8": "pcre2 (Debian/Ubuntu: apt install libpcre2-8-0)",
    "libz": "zlib (Debian/Ubuntu: apt install zlib1g)",
    "libstdc++": "the C++ runtime (Debian/Ubuntu: apt install libstdc++6)",
}


def load_library(path: str) -> None:
    """Load (once per process) the library at ``path``: `BuildUnavailable` in one line where the system cannot."""
    _library(path)


def options(config: EnvConfig, rand_seed: int, num_threads: int, resource_root: str) -> dict[str, bool | int | str]:
    """The options procgen 0.10.7's ``ProcgenGym3Env`` passes to ``libenv_make`` for this config, in its order."""
    num_levels, start_level, mode = config.num_levels, config.start_level, config.distribution_mode
    if mode == "exploration":
        if config.game not in EXPLORATION_LEVELS:
            raise ValueError(f"data.env.distribution_mode=exploration: {config.game} has no exploration level; "
                             f"games that do: {', '.join(EXPLORATION_LEVELS)}")  # fmt: skip
        num_levels, start_level, mode = 1, EXPLORATION_LEVELS[config.game], "hard"
    if not 0 <= rand_seed < 2**31:
        raise ValueError(f"Procgen's rand_seed must be in [0, 2**31), got {rand_seed}")
    return {
        "center_agent": True,
        "use_generated_assets": False,
        "use_monochrome_assets": False,
        "restrict_themes": False,
        "use_backgrounds": True,
        "paint_vel_info": bool(config.paint_vel_info),
        "distribution_mode": DISTRIBUTION_MODE_IDS[mode],
        "env_name": config.game,
        "num_levels": int(num_levels),
        "start_level": int(start_level),
        "num_actions": SPEC.num_actions,
        "use_sequential_levels": bool(config.use_sequential_levels),
        "debug_mode": 0,
        "rand_seed": int(rand_seed),
        "num_threads": int(num_threads),
        "render_human": False,
        "resource_root": resource_root,  # read by the first env a process builds from this library
    }


def _aligned(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """A zeroed array whose data starts on an ``align``-byte boundary."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + align, dtype=np.uint8)
    offset = -raw.ctypes.data % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


class ProcgenVecEnv:
    """A batch of Procgen games (`driml_pl.types.VecEnv`) from the build ``config.build`` names."""

    spec = SPEC

    def __init__(self, config: EnvConfig, rand_seed: int) -> None:
        from driml_pl.procgen_build import files
        from driml_pl.threads import procgen_threads

        self.config = config
        self.num_envs = n = config.num_envs
        build = files(config.build)
        ffi, lib = _library(str(build.library))
        opts = options(config, int(rand_seed), procgen_threads(config.num_threads, n), str(build.assets) + "/")
        # keep every option's data alive while the env lives (procgen may read them later)
        self._keep: list[Any] = []
        items = ffi.new("struct libenv_option[]", len(opts))
        for item, (name, value) in zip(items, opts.items(), strict=True):
            item.name = name.encode()
            if isinstance(value, str):
                data, item.dtype, item.count = ffi.new("char[]", value.encode()), lib.LIBENV_DTYPE_UINT8, len(value)
            elif isinstance(value, bool):
                data, item.dtype, item.count = ffi.new("uint8_t *", value), lib.LIBENV_DTYPE_UINT8, 1
            else:
                data, item.dtype, item.count = ffi.new("int32_t *", value), lib.LIBENV_DTYPE_INT32, 1
            item.data = data
            self._keep.append(data)
        c_options = ffi.new("struct libenv_options *", {"items": items, "count": len(opts)})
        self._keep += [items, c_options]
        # an unreferenced old env finalised by a garbage collection inside libenv_make would close under procgen's
        # feet: collect first, outside the C call
        gc.collect()
        self._ffi, self._lib = ffi, lib
        self._handle = lib.libenv_make(n, c_options[0])
        self._close = weakref.finalize(self, lib.libenv_close, self._handle)
        self._ob, ob_ptrs = self._space(lib.LIBENV_SPACE_OBSERVATION)
        self._ac, ac_ptrs = self._space(lib.LIBENV_SPACE_ACTION)
        self._info, info_ptrs = self._space(lib.LIBENV_SPACE_INFO)
        if self._ob["rgb"].shape[1:] != SPEC.frame_shape or set(self._ac) != {"action"}:
            raise RuntimeError(f"{build.library}: spaces {self._ob['rgb'].shape[1:]}, {sorted(self._ac)} are not "
                               f"Procgen's {SPEC.frame_shape} frames and one discrete action")  # fmt: skip
        self._reward = _aligned((n,), np.dtype(np.float32))
        self._first = _aligned((n,), np.dtype(np.uint8))
        buffers = ffi.new("struct libenv_buffers *")
        buffers.ob, buffers.ac, buffers.info = ob_ptrs, ac_ptrs, info_ptrs
        buffers.rew = ffi.cast("float *", ffi.from_buffer(self._reward))
        buffers.first = ffi.cast("uint8_t *", ffi.from_buffer(self._first))
        self._keep += [ob_ptrs, ac_ptrs, info_ptrs, buffers]
        lib.libenv_set_buffers(self._handle, buffers)

    def _space(self, name: int) -> tuple[dict[str, np.ndarray], Any]:
        """One array (N, *shape) per tensor of a space, and the per-env pointers into them that libenv wants (space
        by space, env by env)."""
        ffi, lib, n = self._ffi, self._lib, self.num_envs
        count = lib.libenv_get_tensortypes(self._handle, name, ffi.NULL)
        types = ffi.new("struct libenv_tensortype[]", max(count, 1))
        lib.libenv_get_tensortypes(self._handle, name, types)
        arrays: dict[str, np.ndarray] = {}
        pointers = ffi.new("void *[]", max(count * n, 1))
        for i in range(count):
            t = types[i]
            array = _aligned((n, *(t.shape[j] for j in range(t.ndim))), _DTYPES[t.dtype])
            arrays[ffi.string(t.name).decode()] = array
            base = ffi.cast("char *", ffi.from_buffer(array))
            for env in range(n):
                pointers[i * n + env] = base + env * array[0].nbytes
        return arrays, pointers

    def observe(self) -> np.ndarray:
        """The current frames, (N, 64, 64, 3) uint8."""
        self._lib.libenv_observe(self._handle)
        return self._ob["rgb"].copy()

    def act(self, actions: np.ndarray) -> None:
        """Start a step: Procgen steps the games in its own threads and returns at once."""
        self._ac["action"][:] = np.asarray(actions, dtype=np.int32).reshape(self.num_envs)
        self._lib.libenv_act(self._handle)

    def observe_step(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Wait for the step started by `act`; ``(reward, next_frame, first)``."""
        self._lib.libenv_observe(self._handle)
        return self._reward.copy(), self._ob["rgb"].copy(), self._first.astype(bool)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.act(actions)
        return self.observe_step()

    def level_seeds(self) -> np.ndarray:
        """The level seed each env is playing now, as Procgen reports it: (N,) int64."""
        self._lib.libenv_observe(self._handle)
        return self._info["level_seed"].astype(np.int64).reshape(self.num_envs)

    def get_state(self) -> list[bytes]:
        """Serialised emulator state of every env (Procgen's own ``get_state``), for checkpoints."""
        buf = self._ffi.new("char[]", MAX_STATE_BYTES)
        out = []
        for env in range(self.num_envs):
            size = self._lib.get_state(self._handle, env, buf, MAX_STATE_BYTES)
            out.append(bytes(self._ffi.buffer(buf, size)))
        return out

    def set_state(self, states: list[bytes]) -> None:
        if len(states) != self.num_envs:
            raise ValueError(f"saved env state has {len(states)} envs, this run has env.num_envs={self.num_envs}")
        for env, state in enumerate(states):
            self._lib.set_state(self._handle, env, state, len(state))

    def close(self) -> None:
        self._close()


def make(config: EnvConfig, rand_seed: int) -> ProcgenVecEnv:
    return ProcgenVecEnv(config, rand_seed)
