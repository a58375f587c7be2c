"""Bad-input fuzz targets for the attention functions: one case generator per public function.

Each ``*_case(draw)`` draws one call (its arguments and their verdicts, see ``fuzz_inputs``),
and the oracle that judges a result: the float64 references of the test suite
(``reference.py``, ``test_variants.reference``, ``test_linear.reference_linear``,
``test_rope.reference_rope``) read the arguments exactly as the caller's dtype holds them.
The cache, layer and remaining targets live in ``fuzz_stateful.py``; ``fuzz_worker.py`` runs
them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from fuzz_inputs import (
    BAD_DTYPES,
    CONVERTED_DTYPES,
    FLOAT_DTYPES,
    HUGE_INTS,
    HUGE_SIZES,
    INVALID,
    LAX,
    VALID,
    Arg,
    Case,
    array_arg,
    as_f64,
    call_code,
    chance,
    float_option,
    int_option,
    junk_arg,
    lit,
    masked,
    pick,
    roll,
    size,
)
from hypothesis import strategies as st
from reference import OUT_RTOL, rel_err, to_bhsd
from test_linear import reference_linear
from test_rope import reference_rope
from test_variants import reference as reference_full

import ferroattn

# Unbounded in practice: sides this large see every key of the tiny fuzz sequences.
_FAR = 2**40


def tolerance(dtype: Any) -> float:
    """Relative tolerance of a result in ``dtype`` (float32 compute, rounded to ``dtype``)."""
    dt = np.dtype(dtype)
    if dt.name == "bfloat16":
        return OUT_RTOL[np.dtype(dt)]
    if dt.itemsize == 2:
        return OUT_RTOL[np.dtype(np.float16)]
    return OUT_RTOL[np.dtype(np.float32)]


def result_dtype(arg: Arg) -> np.dtype:
    """The dtype a result takes for this input (lists are float64 arrays)."""
    return np.asarray(arg.value).dtype


def assert_close(got: Any, want: np.ndarray | None, dtype: Any, what: str = "output") -> None:
    """Type, dtype, shape and relative error against the reference (``want`` None: the
    reference could not be formed, e.g. a zero-size head dimension: shape-free checks only)."""
    assert isinstance(got, np.ndarray), f"{what}: got {type(got).__name__}"
    assert got.dtype == np.dtype(dtype), f"{what}: dtype {got.dtype}, expected {dtype}"
    if want is None:
        return
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    g = as_f64(got)
    bad = np.isnan(g) & ~np.isnan(want)
    assert not bad.any(), f"{what}: NaN where the reference has none"
    err = rel_err(np.where(np.isnan(want), 0, g), np.where(np.isnan(want), 0, want))
    assert err <= tolerance(dtype), f"{what}: relative error {err:.3g} > {tolerance(dtype):.0e}"


def assert_lse(got: Any, want: np.ndarray) -> None:
    assert isinstance(got, np.ndarray) and got.dtype == np.float32, f"lse: {type(got)}"
    assert got.shape == want.shape, f"lse: shape {got.shape}, expected {want.shape}"
    g = got.astype(np.float64)
    assert not np.isnan(g).any(), "lse: NaN"
    same_inf = np.isinf(g) == np.isinf(want)
    assert same_inf.all(), f"lse: -inf at {np.argwhere(~same_inf)[:3].tolist()} differs"
    fin = ~np.isinf(want)
    diff = np.abs(g[fin] - want[fin])
    assert (diff <= 1e-4 * np.maximum(1, np.abs(want[fin]))).all(), f"lse off by {diff.max():.3g}"


def reference_or_none(fn, *args, **kwargs):
    """The reference, or None where it has no answer (a zero-size head dimension, say)."""
    try:
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)
    except (ZeroDivisionError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------
# Shared pieces: problem sizes and q/k/v
# --------------------------------------------------------------------------

HEAD_DIMS = (1, 2, 3, 4, 7, 8, 16, 33)


def draw_dims(draw, *, huge_axes: tuple[str, ...]) -> tuple[dict[str, int], str | None]:
    """(B, Hkv, G (query heads per KV head), Nq, Nk, D, Dv), at times one of them zero or (on
    ``huge_axes``, through zero strides) huge; returns the dims and the odd axis."""
    dims = {
        "B": size(draw, 1, 2),
        "Hkv": size(draw, 1, 3),
        "G": size(draw, 1, 3),
        "Nq": size(draw, 1, 9),
        "Nk": size(draw, 1, 9),
        "D": pick(draw, HEAD_DIMS),
        "Dv": pick(draw, HEAD_DIMS),
    }
    odd = None
    r = roll(draw, 100)
    if r < 8:
        odd = pick(draw, sorted(dims))
        dims[odd] = 0
    elif r < 11 and huge_axes:
        odd = pick(draw, huge_axes)
        dims[odd] = pick(draw, HUGE_SIZES)
    return dims, odd


def user_shape(shape4: tuple[int, ...], rank: int, layout: str) -> tuple[int, ...]:
    b, h, n, d = shape4
    full = (b, h, n, d) if layout == "bhsd" else (b, n, h, d)
    return full[4 - rank :]


def draw_rank(draw, dims: dict[str, int]) -> int:
    if dims["B"] != 1 or not chance(draw, 0.3):
        return 4
    hq = dims["Hkv"] * dims["G"]
    return 2 if hq == 1 and dims["Hkv"] == 1 and chance(draw, 0.5) else 3


def qkv_args(
    draw, dims, odd, *, rank, layout, dtype, with_v=True, huge_names=()
) -> dict[str, Arg]:
    """q, k (and v) of the drawn problem; at times one of them broken (a wrong dtype, shape,
    rank or no array at all: INVALID), a zero-size axis (LAX) or a huge broadcast (LAX)."""
    b, hk, g = dims["B"], dims["Hkv"], dims["G"]
    shapes = {
        "q": (b, hk * g, dims["Nq"], dims["D"]),
        "k": (b, hk, dims["Nk"], dims["D"]),
        "v": (b, hk, dims["Nk"], dims["Dv"]),
    }
    if not with_v:
        del shapes["v"]
    huge = odd is not None and max(dims.values()) >= HUGE_SIZES[0]
    args = {}
    for name, s4 in shapes.items():
        shape = user_shape(s4, rank, layout)
        bcast = tuple(i for i, n in enumerate(shape) if n >= HUGE_SIZES[0])
        verdict = LAX if (huge and name in huge_names) or 0 in shape else VALID
        args[name] = array_arg(draw, shape, dtype, verdict=verdict, bcast=bcast)
    if huge:
        return args
    r = roll(draw, 20)
    victim = pick(draw, sorted(args))
    if r == 0:
        shape = np.shape(args[victim].value)
        args[victim] = array_arg(draw, shape, pick(draw, BAD_DTYPES), verdict=INVALID, layout="c")
    elif r == 1:
        other = pick(draw, [d for d in FLOAT_DTYPES + CONVERTED_DTYPES if d != dtype])
        args[victim] = array_arg(draw, np.shape(args[victim].value), other, verdict=INVALID)
    elif r == 2:
        args[victim] = junk_arg(draw)
    elif r == 3:
        shape = list(np.shape(args[victim].value))
        axis = draw(st.integers(0, len(shape) - 1))
        shape[axis] += 1
        args[victim] = array_arg(draw, tuple(shape), dtype, verdict=LAX)
    elif r == 4:
        shape = np.shape(args[victim].value)
        shape = shape[1:] if len(shape) > 1 and chance(draw, 0.5) else (1, *shape)
        args[victim] = array_arg(draw, shape, dtype, verdict=INVALID)
    return args


def consistent(q4, k4, v4) -> bool:
    """The documented shape rules: batch, heads (Hq a multiple of Hkv >= 1), lengths and
    head dimensions agree."""
    b, hq, _, d = q4.shape
    bk, hk, nk, dk = k4.shape
    if (bk, dk) != (b, d) or hk < 1 or hq % hk:
        return False
    return v4 is None or v4.shape[:3] == (bk, hk, nk)


def as_bhsd(arg: Arg, layout: str) -> np.ndarray | None:
    """A drawn array argument as a 4-D head-major view (None: not a 2-4-D float array); the
    references convert it to float64 themselves (a huge broadcast stays a view here)."""
    try:
        x = np.asarray(arg.value)
    except ValueError:
        return None
    if x.ndim not in (2, 3, 4) or x.dtype.kind not in "fV" or x.dtype.kind == "V" and (
        x.dtype.name != "bfloat16"
    ):
        return None
    return to_bhsd(x, layout)


# --------------------------------------------------------------------------
# Options shared by the attention functions
# --------------------------------------------------------------------------


def causal_arg(draw) -> Arg:
    r = roll(draw, 12)
    if r == 0:
        return lit(pick(draw, ["top", "", "bottom-right", 2, 0.5, None]), INVALID)
    if r == 1:
        return pick(draw, [lit(np.bool_(True), VALID, True), lit(1, VALID, True), lit(0, VALID, False)])
    return lit(pick(draw, [False, True, "bottom_right", "top_left"]))


def _side_meaning(x):
    if x is None or x == -1 or x >= _FAR:
        return None
    return int(x)


def window_arg(draw) -> Arg:
    """None, an int w (meaning (w - 1, 0)) or a (left, right) pair; huge sides are LAX and
    mean unbounded."""
    r = roll(draw, 12)
    if r == 0:
        return lit(pick(draw, [0, -1, -5, (-2, 0), (0, -3), (1, 2, 3), (1,), 2.5, "3",
                               (1.0, 2), (True, 0), True]), INVALID)
    if r == 1:
        w = pick(draw, HUGE_INTS)
        return lit(w, LAX, (None, 0))
    if r == 2:
        sides = [pick(draw, HUGE_INTS), pick(draw, [None, 0, 1, -1, *HUGE_INTS])]
        if chance(draw, 0.5):
            sides.reverse()
        pair = tuple(sides)
        return lit(pair, LAX, tuple(_side_meaning(s) for s in pair))
    if r < 6:
        return lit(None)
    if r < 8:
        w = size(draw, 1, 6)
        return lit(np.int64(w) if chance(draw, 0.2) else w, VALID, (w - 1, 0))
    pair = (pick(draw, [None, -1, 0, 1, 2, 4]), pick(draw, [None, -1, 0, 1, 3]))
    return lit(pair, VALID, tuple(_side_meaning(s) for s in pair))


def scale_arg(draw) -> Arg:
    return float_option(
        draw,
        [None, 0.3, 1.0, 0.0, -0.5, 2.0],
        odd=[
            lit("0.5", LAX, 0.5),
            lit(True, LAX, 1.0),
            lit(np.float16(0.25), VALID, 0.25),
            lit(1e-30, VALID, 1e-30),
            lit(1e39, LAX, "extreme"),
        ],
        bad=[float("nan"), float("inf"), -float("inf"), "abc", [1.0], 1j],
    )


def softcap_arg(draw) -> Arg:
    return float_option(
        draw,
        [None, None, 2.0, 0.5, 30.0],
        odd=[lit("2", LAX, 2.0), lit(1e-45, LAX, "extreme"), lit(1e39, LAX, "extreme")],
        bad=[0.0, -1.0, float("nan"), float("inf"), "abc"],
    )


def kv_lengths_arg(draw, b: int, nk: int) -> Arg:
    r = roll(draw, 10)
    lens = [draw(st.integers(0, nk)) for _ in range(b)]
    if r == 0:
        bad = pick(draw, [lens + [0], [-1] * b, [nk + 1] * b, [[n] for n in lens],
                          [float(n) + 0.5 for n in lens], "abc", [2**70] * b])
        if bad == [] or (isinstance(bad, list) and bad == lens):
            return lit(lens)
        return lit(bad, INVALID)
    if r == 1:
        return Arg(np.asarray(lens, dtype=np.uint64), f"np.asarray({lens!r}, dtype=np.uint64)",
                   VALID, lens)
    if r == 2 and b:
        return Arg(np.full(b, 2**64 - 1, np.uint64), f"np.full({b}, 2**64 - 1, np.uint64)",
                   INVALID)
    return lit(lens)


def mask_arg(draw, b, hq, nq, nk) -> Arg:
    shapes = [(nq, nk), (hq, nq, nk), (b, 1, nq, nk), (1, 1, 1, nk), (nq, 1)]
    r = roll(draw, 10)
    if r == 0:
        bad = pick(draw, [(nq + 1, nk), (2, 1, 1, 1, nk)])
        return array_arg(draw, bad, "bool", verdict=INVALID, layout="c")
    if r == 1:
        return array_arg(draw, (nq, nk), pick(draw, ["float32", "int8"]), verdict=INVALID)
    return array_arg(draw, pick(draw, shapes), "bool")


def bias_arg(draw, b, hq, nq, nk) -> Arg:
    shapes = [(nq, nk), (hq, nq, nk), (b, 1, nq, nk), (1, nk)]
    r = roll(draw, 10)
    if r == 0:
        return array_arg(draw, (nq, nk), pick(draw, ["complex64", "U3", "object"]),
                         verdict=INVALID, layout="c")
    if r == 1:
        return array_arg(draw, (nq + 1, nk + 2), "float32", verdict=INVALID)
    if r == 2:
        v = np.full((nq, nk), 1e300)
        return Arg(v, f"np.full({(nq, nk)!r}, 1e300)", LAX)
    dt = pick(draw, ["float32", "float32", "float64", "float16", "int32"])
    return array_arg(draw, pick(draw, shapes), dt, mag=2.0)


def per_head_arg(draw, name: str, hq: int) -> Arg:
    """alibi_slopes / sinks: one float per query head."""
    r = roll(draw, 10)
    if r == 0:
        bad = pick(draw, [[float("nan")] * hq, [float("inf")] * hq, [1.0] * (hq + 1),
                          [[1.0]] * max(hq, 1), "abc"])
        return lit(bad, INVALID)
    if r == 1 and hq:
        return lit([1e300] * hq, LAX, "extreme")
    if name == "alibi_slopes" and hq and chance(draw, 0.5):
        return Arg(ferroattn.alibi_slopes(hq), f"ferroattn.alibi_slopes({hq})")
    vals = [round(draw(st.floats(-3, 3)) if name == "sinks" else draw(st.floats(0, 1)), 3)
            for _ in range(hq)]
    return lit(vals)


class _NotT5:
    """Looks like a T5Bias, is not one."""

    table = np.zeros((8, 1), np.float32)
    bidirectional = True
    max_distance = 16

    def __repr__(self) -> str:
        return "_NotT5()"


def rel_bias_arg(draw, hq: int) -> Arg:
    bidirectional = draw(st.booleans())
    nb = pick(draw, [4, 8, 32]) if bidirectional else pick(draw, [2, 8, 16])
    per_side = nb // 2 if bidirectional else nb
    max_distance = per_side // 2 + size(draw, 1, 20)
    seed = draw(st.integers(0, 999))
    table_code = f"build(({nb}, {hq}), 'float32', 'c', seed={seed})"
    table = np.random.default_rng(seed).standard_normal((nb, hq)).astype(np.float32)
    verdict, meaning = VALID, None
    r = roll(draw, 10)
    if r == 0:
        max_distance = pick(draw, [per_side // 2, 0, -3, 2.5, None, "16"])
        verdict = INVALID
    elif r == 1:
        max_distance = pick(draw, HUGE_INTS)
        verdict = LAX
    elif r == 2:
        table = table[:, :1] if hq != 1 else np.zeros((nb, 2), np.float32)
        table_code = f"np.zeros({table.shape!r}, np.float32)"
        table = np.zeros(table.shape, np.float32)
        verdict = INVALID
    elif r == 3:
        return Arg(_NotT5(), "_NotT5()", INVALID)
    elif r == 4:
        return lit({"table": [[0.0]]}, INVALID)
    elif r == 5:
        table = np.full((nb, hq), 1e300)
        table_code = f"np.full(({nb}, {hq}), 1e300)"
        verdict, meaning = LAX, "extreme"
    value = ferroattn.T5Bias(table, bidirectional=bidirectional, max_distance=max_distance)
    code = (f"ferroattn.T5Bias({table_code}, bidirectional={bidirectional}, "
            f"max_distance={max_distance!r})")
    return Arg(value, code, verdict, meaning)


def block_args(draw, hq: int, nq: int, nk: int) -> dict[str, Arg]:
    g = math.gcd(nq, nk)
    sizes = [s for s in range(1, g + 1) if g % s == 0] or [1]
    bs = pick(draw, sizes)
    heads = pick(draw, [1, hq]) if hq else 1
    shape = (heads, nq // bs, nk // bs) if heads > 1 or chance(draw, 0.5) else (nq // bs, nk // bs)
    lay = array_arg(draw, shape, "bool", layout="c")
    bs_arg = lit(bs)
    r = roll(draw, 10)
    if r == 0:
        bs_arg = lit(pick(draw, [0, -1, 2.0, "4", nq + nk + 1]), INVALID)
        if bs_arg.value == nq + nk + 1 and nq == nk == 0:
            bs_arg = lit(0, INVALID)
    elif r == 1:
        lay = array_arg(draw, shape, "int8", verdict=INVALID, layout="c")
    elif r == 2:
        lay = array_arg(draw, (shape[-2] + 1, shape[-1]), "bool", verdict=INVALID, layout="c")
    elif r == 3:
        return {"block_layout": lay} if chance(draw, 0.5) else {"block_size": lit(bs, INVALID)}
    elif r == 4 and bs == 1:
        bs_arg = lit(True, LAX, 1)
    return {"block_layout": lay, "block_size": bs_arg}


def out_arg(draw, shape: tuple[int, ...], dtype: str, q: Arg) -> Arg:
    r = roll(draw, 10)
    if r == 0:
        other = "float64" if dtype != "float64" else "float32"
        return array_arg(draw, shape, other, verdict=INVALID, layout="c")
    if r == 1 and shape:
        return array_arg(draw, (*shape[:-1], shape[-1] + 1), dtype, verdict=INVALID, layout="c")
    if r == 2:
        return array_arg(draw, shape, dtype, verdict=INVALID, layout="readonly")
    if r == 3 and isinstance(q.value, np.ndarray) and q.value.shape == shape and (
        q.value.flags.writeable and q.value.size
    ):
        q.setup, q.code = f"q = {q.code}", "q"
        return Arg(q.value, "q", INVALID, setup=q.setup)
    if r == 4:
        return lit([0.0], INVALID)
    return array_arg(draw, shape, dtype, layout=pick(draw, ["c", "f", "neg", "step", "misaligned"]))


def _meanings(args: dict[str, Arg], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: args[k].meaning for k in keys if k in args}


def _extreme(args: dict[str, Arg]) -> bool:
    """Options whose exact result the float64 reference cannot give (beyond float32)."""
    return any(
        isinstance(a.meaning, str) and a.meaning == "extreme" for a in args.values()
    ) or any(
        isinstance(a.value, ferroattn.T5Bias) and isinstance(a.value.max_distance, int)
        and a.value.max_distance >= _FAR for a in args.values()
    )


# --------------------------------------------------------------------------
# attention / attention_weights
# --------------------------------------------------------------------------

_SCORE_OPTIONS = ("causal", "window", "scale", "softcap", "kv_lengths", "mask", "bias",
                  "alibi_slopes", "sinks", "rel_bias", "block_layout", "block_size")


def _attention_like_case(draw, weights: bool) -> Case:
    huge_axes = ("B", "G", "Nq", "Nk") if weights else ("B", "G", "Nq", "Dv")
    dims, odd = draw_dims(draw, huge_axes=huge_axes)
    huge = odd is not None and dims[odd] >= HUGE_SIZES[0]
    layout = pick(draw, ["bhsd", "bshd"])
    rank = 4 if huge else draw_rank(draw, dims)
    dtype = pick(draw, FLOAT_DTYPES + CONVERTED_DTYPES if chance(draw, 0.2) else FLOAT_DTYPES)
    huge_names = {"B": ("q", "k", "v"), "G": ("q",), "Nq": ("q",), "Nk": ("k",), "Dv": ("v",)}
    args = qkv_args(draw, dims, odd, rank=rank, layout=layout, dtype=dtype, with_v=not weights,
                    huge_names=huge_names.get(odd or "", ()))
    b, hq, nq, nk = dims["B"], dims["Hkv"] * dims["G"], dims["Nq"], dims["Nk"]
    small = not huge
    if chance(draw, 0.5):
        args["causal"] = causal_arg(draw)
    if chance(draw, 0.3):
        args["window"] = window_arg(draw)
    if chance(draw, 0.25):
        args["scale"] = scale_arg(draw)
    if chance(draw, 0.2):
        args["softcap"] = softcap_arg(draw)
    if chance(draw, 0.2):
        args["kv_lengths"] = kv_lengths_arg(draw, b, nk)
    if small and chance(draw, 0.15):
        args["mask"] = mask_arg(draw, b, hq, nq, nk)
    if small and chance(draw, 0.15):
        args["bias"] = bias_arg(draw, b, hq, nq, nk)
    if chance(draw, 0.12):
        args["alibi_slopes"] = per_head_arg(draw, "alibi_slopes", hq)
    if chance(draw, 0.12):
        args["sinks"] = per_head_arg(draw, "sinks", hq)
    if chance(draw, 0.1):
        args["rel_bias"] = rel_bias_arg(draw, hq)
    if small and chance(draw, 0.1):
        args.update(block_args(draw, hq, nq, nk))
    if layout != "bhsd" or chance(draw, 0.1):
        args["layout"] = lit(layout) if chance(draw, 0.95) else lit(
            pick(draw, ["BHSD", "", None, "sbhd"]), INVALID)
    if chance(draw, 0.05):
        args["backend"] = lit(pick(draw, ["gpu", None, 1, "CPU"]), INVALID)
    elif chance(draw, 0.05):
        args["backend"] = lit("cpu")
    return_lse = False
    if not weights:
        if chance(draw, 0.4):
            args["return_lse"] = pick(draw, [lit(True), lit(False), lit(np.bool_(True), LAX, True),
                                             lit(1, LAX, True), lit(None, LAX, False)])
            return_lse = bool(args["return_lse"].meaning)
        if small and chance(draw, 0.15):
            shape4 = (b, hq, nq, dims["Dv"])
            args["out"] = out_arg(draw, user_shape(shape4, rank, layout), dtype, args["q"])
    func = "attention_weights" if weights else "attention"
    fn = getattr(ferroattn, func)
    pos = ("q", "k") if weights else ("q", "k", "v")
    values = {n: a.value for n, a in args.items()}
    case = Case(
        func,
        lambda: fn(**values),
        call_code("ferroattn." + func, args, pos),
        args,
    )
    arrays = {n: as_bhsd(args[n], layout) for n in pos}
    if any(a is None for a in arrays.values()):
        return case  # a junk or non-float argument: INVALID already
    q4, k4 = arrays["q"], arrays["k"]
    v4 = None if weights else arrays["v"]
    if not consistent(q4, k4, v4):
        case.must_fail = True
        case.extra_blame = pos
        return case
    if case.invalid or huge:
        return case
    case.check = _attention_oracle(args, q4, k4, v4, rank, layout, weights, return_lse)
    return case


def _attention_oracle(args, q4, k4, v4, rank, layout, weights, return_lse):
    opts = _meanings(args, _SCORE_OPTIONS)
    extreme = _extreme(args)
    dtype = result_dtype(args["q"])
    ref = None if extreme else reference_or_none(reference_full, q4, k4, v4, **opts)
    b, hq, nq, _ = q4.shape
    nk = k4.shape[2]

    def check(result):
        if weights:
            want = None if ref is None else ref[2].reshape((b, hq, nq, nk)[4 - rank :])
            assert_close(result, want, dtype, "weights")
            if want is None:
                assert result.shape == (b, hq, nq, nk)[4 - rank :], result.shape
            return
        out = result
        if return_lse:
            assert isinstance(result, tuple) and len(result) == 2, type(result)
            out, lse = result
        if "out" in args:
            assert out is args["out"].value, "the result is not the out array"
        want_shape = user_shape((b, hq, nq, v4.shape[3]), rank, layout)
        assert np.shape(out) == want_shape, f"shape {np.shape(out)}, expected {want_shape}"
        if ref is None:
            assert_close(out, None, dtype)
            assert not np.isnan(as_f64(out)).any(), "NaN in the output"
            return
        assert_close(to_bhsd(np.asarray(out), layout), ref[0], dtype)
        if return_lse:
            assert_lse(lse, ref[1].reshape((b, hq, nq)[4 - rank :]))

    return check


def attention_case(draw) -> Case:
    return _attention_like_case(draw, weights=False)


def attention_weights_case(draw) -> Case:
    return _attention_like_case(draw, weights=True)


# --------------------------------------------------------------------------
# attention_varlen
# --------------------------------------------------------------------------


def _cu_arg(draw, lens: list[int], name: str) -> Arg:
    cu = [0, *np.cumsum(lens).tolist()]
    r = roll(draw, 12)
    if r == 0:
        bad = pick(draw, [cu[1:] or [1], [*cu[:-1], cu[-1] + 1], [0, 2**64 - 1], [],
                          [float(c) for c in cu], [cu], "abc", [0, -1, *cu[1:]]])
        if bad == cu:
            return lit(cu)
        return lit(bad, INVALID)
    if r == 1:
        return Arg(np.asarray(cu, np.int32), f"np.asarray({cu!r}, np.int32)", VALID, cu)
    return lit(cu)


def attention_varlen_case(draw) -> Case:
    dims, odd = draw_dims(draw, huge_axes=())
    n_seq = size(draw, 1, 3)
    lens_q = [draw(st.integers(0, 5)) for _ in range(n_seq)]
    lens_k = [draw(st.integers(0, 5)) for _ in range(n_seq)]
    dims.update(B=1, Nq=sum(lens_q), Nk=sum(lens_k))
    dtype = pick(draw, FLOAT_DTYPES)
    args = qkv_args(draw, dims, odd if odd not in ("B", "Nq", "Nk") else None, rank=3,
                    layout="bshd", dtype=dtype)
    args["cu_seqlens_q"] = _cu_arg(draw, lens_q, "cu_seqlens_q")
    args["cu_seqlens_k"] = _cu_arg(draw, lens_k, "cu_seqlens_k")
    if chance(draw, 0.05):
        args["cu_seqlens_k"] = lit([0, *np.cumsum(lens_k).tolist(), sum(lens_k)], INVALID)
    for name, maker, p in (("causal", causal_arg, 0.5), ("window", window_arg, 0.3),
                           ("scale", scale_arg, 0.2), ("softcap", softcap_arg, 0.2)):
        if chance(draw, p):
            args[name] = maker(draw)
    return_lse = chance(draw, 0.4)
    if return_lse:
        args["return_lse"] = lit(True)
    if chance(draw, 0.1):
        hq = dims["Hkv"] * dims["G"]
        args["out"] = out_arg(draw, (dims["Nq"], hq, dims["Dv"]), dtype, args["q"])
    pos = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k")
    values = {n: a.value for n, a in args.items()}
    case = Case(
        "attention_varlen",
        lambda: ferroattn.attention_varlen(**values),
        call_code("ferroattn.attention_varlen", args, pos),
        args,
    )
    arrays = {n: as_bhsd(args[n], "bshd") for n in ("q", "k", "v")}
    if any(a is None or np.ndim(args[n].value) != 3 for n, a in arrays.items()):
        case.must_fail = True
        case.extra_blame = ("q", "k", "v")
        return case
    if not consistent(*arrays.values()):
        case.must_fail = True
        case.extra_blame = ("q", "k", "v")
        return case
    if any(args[n].verdict != VALID for n in ("q", "k", "v")):
        case.extra_blame = ("cu_seqlens_q", "cu_seqlens_k")  # token counts disagree with them
    if case.invalid:
        return case
    q, k, v = (as_f64(args[n].value) for n in ("q", "k", "v"))
    cq, ck = args["cu_seqlens_q"].meaning, args["cu_seqlens_k"].meaning
    opts = _meanings(args, ("causal", "window", "scale", "softcap"))
    extreme = _extreme(args)
    ref = None if extreme else reference_or_none(_varlen_reference, q, k, v, cq, ck, **opts)

    def check(result):
        out, lse = result if return_lse else (result, None)
        if "out" in args:
            assert out is args["out"].value, "the result is not the out array"
        assert_close(out, None if ref is None else ref[0], result_dtype(args["q"]))
        if ref is not None and return_lse:
            assert_lse(lse, ref[1])

    case.check = check
    return case


def _varlen_reference(q, k, v, cq, ck, **opts):
    from reference import reference_varlen

    return reference_varlen(q, k, v, cq, ck, **opts)


# --------------------------------------------------------------------------
# linear_attention and LinearAttentionState
# --------------------------------------------------------------------------


def _eps_arg(draw) -> Arg:
    return float_option(
        draw,
        [1e-6, 1e-3, 1.0],
        odd=[lit(np.float32(1e-4), VALID, float(np.float32(1e-4))), lit(1e-300, LAX, "extreme")],
        bad=[0.0, -1e-6, float("nan"), float("inf"), "abc", True, None],
    )


def _feature_map_arg(draw) -> Arg:
    if chance(draw, 0.1):
        return lit(pick(draw, ["ELU1", "softmax", None, 1]), INVALID)
    return lit(pick(draw, ["elu1", "relu"]))


def linear_attention_case(draw) -> Case:
    dims, odd = draw_dims(draw, huge_axes=("B", "Nq", "Dv"))
    huge = odd is not None and dims[odd] >= HUGE_SIZES[0]
    rank = 4 if huge else draw_rank(draw, dims)
    dtype = pick(draw, FLOAT_DTYPES)
    huge_names = {"B": ("q", "k", "v"), "Nq": ("q",), "Dv": ("v",)}.get(odd or "", ())
    args = qkv_args(draw, dims, odd, rank=rank, layout="bhsd", dtype=dtype, huge_names=huge_names)
    causal = False
    if chance(draw, 0.5):
        causal_v = pick(draw, [True, False, True])
        args["causal"] = lit(causal_v)
        causal = causal_v
        if chance(draw, 0.1):
            args["causal"] = lit(pick(draw, [1, "yes", None]), INVALID)
    if chance(draw, 0.3):
        args["feature_map"] = _feature_map_arg(draw)
    if chance(draw, 0.3):
        args["eps"] = _eps_arg(draw)
    if not huge and chance(draw, 0.1):
        shape4 = (dims["B"], dims["Hkv"] * dims["G"], dims["Nq"], dims["Dv"])
        args["out"] = out_arg(draw, user_shape(shape4, rank, "bhsd"), dtype, args["q"])
    values = {n: a.value for n, a in args.items()}
    case = Case(
        "linear_attention",
        lambda: ferroattn.linear_attention(**values),
        call_code("ferroattn.linear_attention", args, ("q", "k", "v")),
        args,
    )
    arrays = {n: as_bhsd(args[n], "bhsd") for n in ("q", "k", "v")}
    if any(a is None for a in arrays.values()):
        return case
    q4, k4, v4 = arrays.values()
    if not consistent(q4, k4, v4) or (causal and q4.shape[2] != k4.shape[2]):
        case.must_fail = True
        case.extra_blame = ("q", "k", "v")
        return case
    if case.invalid or huge:
        return case
    opts = {"causal": causal, **_meanings(args, ("feature_map", "eps"))}
    extreme = _extreme(args)
    ref = None if extreme else reference_or_none(reference_linear, q4, k4, v4, **opts)
    dt = result_dtype(args["q"])

    def check(result):
        if "out" in args:
            assert result is args["out"].value, "the result is not the out array"
        want = None if ref is None else ref.reshape(ref.shape[4 - rank :])
        assert_close(result, want, dt)
        if want is None:
            assert not np.isnan(as_f64(result)).any(), "NaN in the output"

    case.check = check
    return case


def linear_state_cases(draw):
    """LinearAttentionState: the constructor, then steps checked against causal
    linear attention over everything fed so far."""
    b, hk, g, d = size(draw, 1, 2), size(draw, 1, 3), size(draw, 1, 3), pick(draw, HEAD_DIMS)
    dv = pick(draw, HEAD_DIMS)
    args = {
        "batch": int_option(draw, [b]),
        "heads": int_option(draw, [hk * g]),
        "head_dim": int_option(draw, [d]),
    }
    if chance(draw, 0.5):
        args["value_dim"] = int_option(draw, [dv], none_ok=True)
    if chance(draw, 0.5):
        args["kv_heads"] = int_option(draw, [hk], none_ok=True)
    if chance(draw, 0.2):
        args["feature_map"] = _feature_map_arg(draw)
    if chance(draw, 0.2):
        args["eps"] = _eps_arg(draw)
    for name, a in args.items():
        if a.verdict == LAX and isinstance(a.value, int) and a.value >= 2**31:
            a.meaning = "huge"
        elif a.verdict == LAX and isinstance(a.value, bool):
            a.verdict = INVALID  # documented: ints; bools are refused like everywhere in linear
    values = {n: a.value for n, a in args.items()}
    ctor = Case(
        "LinearAttentionState",
        lambda: ferroattn.LinearAttentionState(**values),
        call_code("ferroattn.LinearAttentionState", args, ("batch", "heads", "head_dim"),
                  assign="state = "),
        args,
    )
    m = {n: a.meaning for n, a in args.items()}
    heads = m["heads"]
    kvh = heads if m.get("kv_heads") is None else m["kv_heads"]
    if not ctor.invalid and isinstance(heads, int) and isinstance(kvh, int) and kvh and heads % kvh:
        ctor.must_fail = True
        ctor.extra_blame = ("heads", "kv_heads")
    if any(v == "huge" for v in m.values()):
        yield ctor
        return
    if ctor.invalid:
        ctor.check = None
        yield ctor
        return
    holder: dict[str, Any] = {}

    def make():
        holder["state"] = ferroattn.LinearAttentionState(**values)
        return holder["state"]

    ctor.call = make
    yield ctor
    if "state" not in holder:
        return
    state = holder["state"]
    hd, vd = m["head_dim"], m.get("value_dim") or m["head_dim"]
    fm, eps = m.get("feature_map", "elu1"), m.get("eps", 1e-6)
    if eps == "extreme":
        return
    fed: list[tuple[np.ndarray, ...]] = []
    for _ in range(size(draw, 1, 3)):
        t = size(draw, 0, 4)
        dtype = pick(draw, FLOAT_DTYPES)
        shapes = {"q": (m["batch"], heads, t, hd), "k": (m["batch"], kvh, t, hd),
                  "v": (m["batch"], kvh, t, vd)}
        sargs = {n: array_arg(draw, s, dtype, allow_list=False) for n, s in shapes.items()}
        if chance(draw, 0.15):
            victim = pick(draw, ["q", "k", "v"])
            s = list(shapes[victim])
            s[pick(draw, [0, 1, 3])] += 1
            sargs[victim] = array_arg(draw, tuple(s), dtype, verdict=INVALID)
        before = state.state
        svals = {n: a.value for n, a in sargs.items()}
        case = Case(
            "LinearAttentionState.step",
            lambda svals=svals: state.step(**svals),
            call_code("state.step", sargs, ("q", "k", "v")),
            sargs,
        )

        def unchanged(before=before):
            after = state.state
            for x, y in zip(before, after, strict=True):
                assert np.array_equal(x, y), "a failed step changed the state"

        case.after_error = unchanged
        if not case.invalid:
            q_all = np.concatenate([f[0] for f in fed] + [as_f64(svals["q"])], axis=2)
            k_all = np.concatenate([f[1] for f in fed] + [as_f64(svals["k"])], axis=2)
            v_all = np.concatenate([f[2] for f in fed] + [as_f64(svals["v"])], axis=2)
            want = reference_linear(q_all, k_all, v_all, causal=True, feature_map=fm, eps=eps)
            want = want[:, :, want.shape[2] - t :]

            def check(result, want=want, dtype=dtype, svals=svals):
                fed.append(tuple(as_f64(svals[n]) for n in ("q", "k", "v")))
                assert_close(result, want, dtype)

            case.check = check
        yield case
        if case.invalid:
            continue


# --------------------------------------------------------------------------
# rope
# --------------------------------------------------------------------------


def rope_case(draw) -> Case:
    rank = size(draw, 2, 4)
    d = pick(draw, [2, 4, 8, 16, 6, 3, 0])
    n = size(draw, 0, 7)
    lead = tuple(size(draw, 1, 3) for _ in range(rank - 2))
    shape = (*lead, n, d)
    dtype = pick(draw, FLOAT_DTYPES + (">f4",))
    args: dict[str, Arg] = {}
    huge = chance(draw, 0.03)
    if huge:
        shape = (*lead, HUGE_SIZES[1], 8)
        n, d = shape[-2], 8
        args["x"] = array_arg(draw, shape, dtype, verdict=LAX, bcast=(rank - 2,))
    elif chance(draw, 0.05):
        args["x"] = array_arg(draw, shape, pick(draw, BAD_DTYPES), verdict=INVALID, layout="c")
    else:
        args["x"] = array_arg(draw, shape, dtype, verdict=LAX if d % 2 or 0 in shape else VALID)
    if d % 2:
        args["x"].verdict = INVALID
    per_seq = rank == 4 and chance(draw, 0.3)
    pshape = (shape[0], n) if per_seq else (n,)
    r = roll(draw, 12)
    if huge:
        pos = Arg(np.broadcast_to(np.zeros(1, np.int64), (n,)),
                  f"np.broadcast_to(np.zeros(1, np.int64), ({n},))", LAX)
    elif r == 0:
        pos = array_arg(draw, pshape, pick(draw, ["float32", "bool", "complex64"]),
                        verdict=INVALID, layout="c")
        if 0 in pshape:
            pos.verdict = LAX
    elif r == 1:
        pos = lit(list(range(n + 1)), INVALID)
    elif r == 2:
        vals = np.full(pshape, 2**64 - 1, np.uint64)
        pos = Arg(vals, f"np.full({pshape!r}, 2**64 - 1, np.uint64)", LAX, vals.astype(np.float64))
    elif r == 3:
        vals = draw(st.integers(-(2**62), 2**62))
        arr = np.full(pshape, vals, np.int64)
        pos = Arg(arr, f"np.full({pshape!r}, {vals}, np.int64)", VALID)
    else:
        seed = draw(st.integers(0, 999))
        arr = np.random.default_rng(seed).integers(0, 5000, size=pshape)
        pos = Arg(arr, f"np.random.default_rng({seed}).integers(0, 5000, size={pshape!r})")
    args["positions"] = pos
    if chance(draw, 0.3):
        args["theta"] = float_option(draw, [10000.0, 500000.0, 2.0, 1e-3],
                                     odd=[lit("100", LAX, 100.0), lit(1e-300, LAX, "extreme")],
                                     bad=[0.0, -1.0, float("nan"), float("inf"), "abc", None])
    if chance(draw, 0.3):
        args["interleaved"] = lit(draw(st.booleans()))
    if chance(draw, 0.3) and d >= 2:
        rds = [x for x in range(2, d + 1, 2)]
        args["rotary_dim"] = lit(pick(draw, rds)) if chance(draw, 0.8) else lit(
            pick(draw, [0, 1, d + 2, 2.0, True, "2"]), INVALID)
    in_place = False
    if not huge and chance(draw, 0.15):
        if chance(draw, 0.3) and isinstance(args["x"].value, np.ndarray) and (
            args["x"].value.flags.writeable
        ):
            args["out"] = Arg(args["x"].value, "x  # in place", VALID)
            in_place = True
        else:
            args["out"] = out_arg(draw, shape, dtype, args["x"])
    values = {k: a.value for k, a in args.items()}
    x_before = None if not in_place else np.array(args["x"].value, copy=True)
    case = Case("rope", lambda: ferroattn.rope(**values),
                call_code("ferroattn.rope", args, ("x", "positions")), args)
    if case.invalid or huge:
        return case
    x64 = as_f64(x_before if in_place else args["x"].value)
    opts = {k: args[k].meaning for k in ("theta", "interleaved", "rotary_dim") if k in args}
    if opts.get("theta") == "extreme":
        return case
    try:
        want = reference_rope(x64, as_f64(args["positions"].meaning), **opts)
    except ValueError:
        return case
    dt = result_dtype(args["x"])

    def check(result):
        if "out" in args:
            assert result is args["out"].value, "the result is not the out array"
        assert_close(result, want, dt)

    case.check = check
    return case


TARGETS = {
    "attention": attention_case,
    "attention_weights": attention_weights_case,
    "attention_varlen": attention_varlen_case,
    "linear_attention": linear_attention_case,
    "LinearAttentionState": linear_state_cases,
    "rope": rope_case,
}


# --------------------------------------------------------------------------
# merge_partials
# --------------------------------------------------------------------------


def _merge_reference(outs: list[np.ndarray], lses: list[np.ndarray]):
    """The documented merge in float64: parts whose lse is -inf for a row add nothing."""
    lse = np.stack(lses)
    top = lse.max(axis=0)
    shift = np.where(np.isneginf(top), 0.0, top)
    w = np.exp(lse - shift[None])
    total = w.sum(axis=0)
    empty = total == 0
    merged_lse = np.where(empty, -np.inf, shift + np.log(np.where(empty, 1, total)))
    w = w / np.where(empty, 1, total)[None]
    acc = np.zeros(outs[0].shape)
    for o, wp, lp in zip(outs, w, lse, strict=True):
        acc += np.where(np.isneginf(lp)[..., None], 0.0, wp[..., None] * np.nan_to_num(o))
    return acc, merged_lse


def merge_partials_case(draw) -> Case:
    parts = size(draw, 1, 3)
    shape = tuple(size(draw, 1, 3) for _ in range(size(draw, 0, 2))) + (size(draw, 0, 5),
                                                                         size(draw, 1, 6))
    dtype = pick(draw, FLOAT_DTYPES)
    lse_dtype = pick(draw, ["float32", "float32", "float64"])
    outs = [array_arg(draw, shape, dtype) for _ in range(parts)]
    lses = [array_arg(draw, shape[:-1], lse_dtype, mag=3.0) for _ in range(parts)]
    for lse_arg, out in zip(lses, outs, strict=True):
        if chance(draw, 0.3) and isinstance(lse_arg.value, np.ndarray) and lse_arg.value.size:
            # A part that saw no key for some rows: -inf there, and garbage in its output.
            lse_arg.value = masked(lse_arg.value, -np.inf, 1)
            lse_arg.code = f"masked({lse_arg.code}, -np.inf, 1)"
            out.value = masked(out.value, np.nan, 2)
            out.code = f"masked({out.code}, np.nan, 2)"
            lse_arg.meaning, out.meaning = lse_arg.value, out.value
    args: dict[str, Arg] = {}
    form = pick(draw, ["list", "list", "tuple", "stacked"])
    if form == "stacked" and all(isinstance(a.value, np.ndarray) for a in outs + lses):
        args["outputs"] = Arg(np.stack([a.value for a in outs]),
                              "np.stack([" + ", ".join(a.code for a in outs) + "])")
        args["lses"] = Arg(np.stack([a.value for a in lses]),
                           "np.stack([" + ", ".join(a.code for a in lses) + "])")
    else:
        wrap = tuple if form == "tuple" else list
        args["outputs"] = Arg(wrap(a.value for a in outs),
                              "[" + ", ".join(a.code for a in outs) + "]")
        args["lses"] = Arg(wrap(a.value for a in lses), "[" + ", ".join(a.code for a in lses) + "]")
    r = roll(draw, 15)
    if r == 0:
        args["outputs"] = lit(pick(draw, [[], "abc", 5, None]), INVALID)
    elif r == 1:
        args["lses"] = Arg(list(args["lses"].value)[:-1] or [], "lses[:-1]", INVALID)
    elif r == 2:
        bad = array_arg(draw, shape, pick(draw, ["int32", "complex64", "bool"]), layout="c")
        args["outputs"] = Arg([bad.value, *list(args["outputs"].value)[1:]],
                              f"[{bad.code}, ...]", INVALID)
    elif r == 3:
        bad = array_arg(draw, (*shape[:-1], shape[-1] + 1), dtype, layout="c")
        args["outputs"] = Arg([*list(args["outputs"].value), bad.value], f"[..., {bad.code}]",
                              INVALID)
    elif r == 4:
        bad = array_arg(draw, shape, lse_dtype, layout="c")
        args["lses"] = Arg([bad.value] * parts, f"[{bad.code}] * {parts}", INVALID)
    elif r == 5:
        v = np.full(shape[:-1], pick(draw, [np.inf, np.nan]), np.float32)
        args["lses"] = Arg([v] * parts, f"[np.full({shape[:-1]!r}, {v.flat[0] if v.size else 0}, "
                                        f"np.float32)] * {parts}", LAX, "extreme")
    if chance(draw, 0.15):
        out_dtype = dtype if chance(draw, 0.7) else pick(draw, ["float64", "float16"])
        args["out"] = array_arg(draw, shape, out_dtype, layout=pick(draw, ["c", "neg", "step"]),
                                verdict=VALID if out_dtype == dtype else INVALID)
    values = {k: a.value for k, a in args.items()}
    case = Case("merge_partials", lambda: ferroattn.merge_partials(**values),
                call_code("ferroattn.merge_partials", args, ("outputs", "lses")), args)
    if case.invalid or _extreme(args):
        return case
    ref = _merge_reference([as_f64(a.meaning) for a in outs], [as_f64(a.meaning) for a in lses])
    out_dt = result_dtype(outs[0])
    want_lse_dt = np.float64 if lse_dtype == "float64" else np.float32

    def check(result):
        assert isinstance(result, tuple) and len(result) == 2, type(result)
        out, lse = result
        if "out" in args:
            assert out is args["out"].value, "the result is not the out array"
        assert_close(out, ref[0], out_dt)
        assert lse.dtype == want_lse_dt, f"lse dtype {lse.dtype}"
        g = lse.astype(np.float64)
        assert (np.isneginf(g) == np.isneginf(ref[1])).all(), "lse -inf pattern"
        fin = ~np.isneginf(ref[1])
        assert np.allclose(g[fin], ref[1][fin], rtol=1e-6, atol=1e-5), "lse values"

    case.check = check
    return case


# --------------------------------------------------------------------------
# alibi_slopes, the block layouts, set_num_threads
# --------------------------------------------------------------------------


def _alibi_reference(n: int) -> np.ndarray:
    """Press et al.'s slopes: a geometric sequence from 2^(-8/n) for a power of two n; other n
    take those of the power of two below and every other one of the power above."""

    def power_of_two(m):
        return [2.0 ** (-8.0 * (i + 1) / m) for i in range(m)]

    low = 2 ** int(math.floor(math.log2(n)))
    if low == n:
        return np.asarray(power_of_two(n))
    return np.asarray(power_of_two(low) + power_of_two(2 * low)[0::2][: n - low])


def alibi_slopes_case(draw) -> Case:
    r = roll(draw, 20)
    if r == 0:
        arg = lit(pick(draw, HUGE_INTS), LAX)
    elif r == 1:
        arg = lit(pick(draw, [0, -1, 2.0, "4", None, 1.5]), INVALID)
    elif r == 2:
        arg = lit(True, LAX, 1)
    else:
        n = pick(draw, [1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 40, 64, 80])
        arg = lit(np.int64(n) if r == 3 else n, VALID, n)
    case = Case("alibi_slopes", lambda: ferroattn.alibi_slopes(arg.value),
                f"ferroattn.alibi_slopes({arg.code})", {"num_heads": arg})
    if case.invalid or arg.meaning >= 2**31:
        return case
    want = _alibi_reference(arg.meaning)

    def check(result):
        assert isinstance(result, np.ndarray) and result.dtype == np.float32, type(result)
        assert result.shape == want.shape and np.allclose(result, want, rtol=1e-6), result

    case.check = check
    return case


def _count_arg(draw, valid, *, lo: int = 0) -> Arg:
    """A count option: valid ints, negative ints (INVALID), floats (INVALID), bools (LAX)."""
    r = roll(draw, 12)
    if r == 0:
        return lit(pick(draw, [lo - 1, lo - 3]), INVALID)
    if r == 1:
        return lit(pick(draw, [1.5, 2.0, "1", None]), INVALID)
    if r == 2:
        b = draw(st.booleans())
        return lit(b, LAX, int(b))
    return lit(pick(draw, valid))


def layout_case(draw) -> Case:
    """local_global_layout, bigbird_layout and strided_layout against their documented rules."""
    func = pick(draw, ["local_global_layout", "bigbird_layout", "strided_layout"])
    r = roll(draw, 20)
    if r == 0:
        n_arg = lit(pick(draw, HUGE_INTS[:3]), LAX)
    elif r == 1:
        n_arg = lit(pick(draw, [0, -2, 3.0, "4", None, True]), INVALID)
    else:
        n_arg = lit(size(draw, 1, 12))
    args = {"n_blocks": n_arg}
    if func == "strided_layout":
        if chance(draw, 0.5):
            args["local"] = _count_arg(draw, [0, 1, 2])
        if chance(draw, 0.5):
            args["stride"] = _count_arg(draw, [1, 2, 3, 4], lo=1)
    else:
        if chance(draw, 0.5):
            args["window"] = _count_arg(draw, [0, 1, 2, 3])
        if chance(draw, 0.5):
            args["global_blocks"] = _count_arg(draw, [0, 1, 2])
        if func == "bigbird_layout":
            if chance(draw, 0.5):
                args["random_blocks"] = _count_arg(draw, [0, 1, 2, 5])
            if chance(draw, 0.3):
                args["seed"] = lit(pick(draw, [0, 7, 2**40])) if chance(draw, 0.8) else lit(
                    pick(draw, [-1, "x", 1.5]), INVALID)
    if chance(draw, 0.4):
        args["causal"] = lit(draw(st.booleans()))
    fn = getattr(ferroattn, func)
    values = {k: a.value for k, a in args.items()}
    case = Case(func, lambda: fn(**values), call_code("ferroattn." + func, args, ("n_blocks",)),
                args)
    if case.invalid or n_arg.meaning >= 2**31:
        return case
    m = {k: a.meaning for k, a in args.items()}
    n = m["n_blocks"]
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    causal = m.get("causal", func == "strided_layout")
    if func == "strided_layout":
        stride = m.get("stride", 4)
        want = (np.abs(i - j) <= m.get("local", 1)) | (j % stride == stride - 1)
    else:
        g = m.get("global_blocks", 1)
        want = (np.abs(i - j) <= m.get("window", 1)) | (i < g) | (j < g)
    if causal:
        want = want & (j <= i)

    def check(result):
        assert isinstance(result, np.ndarray) and result.dtype == np.bool_, type(result)
        assert result.shape == (n, n), result.shape
        if func == "bigbird_layout":
            assert (result | want == result).all(), "a local or global block is missing"
            picks = min(m.get("random_blocks", 2), n)
            extra = result.sum(axis=1)
            assert (extra >= np.minimum(want.sum(axis=1), n)).all()
            if not causal:
                assert (extra >= picks).all(), "a row has fewer than random_blocks blocks"
            assert (fn(**values) == result).all(), "not deterministic for one seed"
        else:
            assert (result == want).all(), f"differs from the rule at {np.argwhere(result != want)[:3].tolist()}"

    case.check = check
    return case


def set_num_threads_case(draw) -> Case:
    r = roll(draw, 10)
    if r == 0:
        arg = lit(pick(draw, [2**31, 2**40, 2**63, 2**64, 2**70]), INVALID)
    elif r == 1:
        arg = lit(pick(draw, [0, -1, 2.0, "2", None]), INVALID)
    elif r == 2:
        b = draw(st.booleans())
        arg = lit(b, LAX if b else INVALID, 1)
    else:
        n = size(draw, 1, 4)
        arg = lit(np.int64(n) if r == 3 else n, VALID, n)
    before = ferroattn.get_num_threads()

    def call():
        try:
            ferroattn.set_num_threads(arg.value)
            return ferroattn.get_num_threads()
        finally:
            # Never run a kernel with an absurd count here: it would start that many threads.
            ferroattn.set_num_threads(before)

    def check(got):
        assert got == arg.meaning, f"get_num_threads() is {got}, expected {arg.meaning}"

    return Case("set_num_threads", call, f"ferroattn.set_num_threads({arg.code})",
                {"n": arg}, check=check)


TARGETS.update(
    merge_partials=merge_partials_case,
    alibi_slopes=alibi_slopes_case,
    layouts=layout_case,
    set_num_threads=set_num_threads_case,
)
