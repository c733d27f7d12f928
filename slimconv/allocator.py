"""glibc's malloc during a long CPU training run: heal frees and reallocates most of its memory every step, in
blocks that glibc's default (a heap that keeps what it once held) never gives back. Not in memory.py (heal's memory
estimate): that module imports heal, and heal calls these."""
import ctypes
import gc
import os

MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
RETURNED_FROM = 1 << 20


def _glibc():
    """glibc's C library, or None outside glibc or when the environment configures its malloc (which then wins)."""
    if any(k in os.environ for k in MALLOC_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc's own: musl also has a mallopt, which does nothing)
        return libc
    except (OSError, AttributeError):
        return None


def return_freed_memory(threshold: int = RETURNED_FROM) -> bool:
    """Makes glibc's malloc serve every block of ``threshold`` bytes or more with its own mapping, given back to the
    system when it is freed. Returns whether it did: not outside glibc, and not when the environment sets one of
    malloc's own settings (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_ARENA_MAX``, ...), which then win.

    A CPU heal allocates and frees most of its memory every step: activations, gathered layers and logits, in
    blocks of one to a few hundred MB. glibc's default threshold rises to the largest block freed so far (up to
    32 MB), so after the first step blocks under that come from the heap, which keeps what it once held. Measured
    on SmolLM2-135M on two torchrun CPU ranks (docs/results/healing.md, "Lower peak memory per rank"): a peak of
    2.2 GB per rank with this threshold against 4.1 GB without. The cost is the page faults of mapping that memory
    afresh every step: steps 19% slower there."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


def trim_heap() -> None:
    """Gives the free pages inside glibc's heap back to the system now (``malloc_trim``): once, before training,
    for the small blocks that loading the models and cutting the windows freed (about 20 MB a rank)."""
    libc = _glibc()
    if libc is not None:
        gc.collect()
        libc.malloc_trim(0)
