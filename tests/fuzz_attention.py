"""Bad-input fuzz targets for attention, attention_weights and attention_varlen, and the
drawing of their inputs (problem sizes, q/k/v, every score option) that the other targets
reuse.

Each ``*_case(draw)`` draws one call (its arguments and their verdicts, see ``fuzz_inputs``)
and the oracle that judges a result: the float64 references of the test suite
(``reference.py``: ``reference`` and ``reference_varlen``) read the arguments exactly as the
caller's dtype holds them.
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
    assert_close,
    assert_lse,
    call_code,
    chance,
    float_option,
    junk_arg,
    lit,
    pick,
    reference_or_none,
    result_dtype,
    roll,
    size,
)
from hypothesis import strategies as st
from reference import reference as reference_full
from reference import reference_varlen, to_bhsd

import ferroattn

# Unbounded in practice: sides this large see every key of the tiny fuzz sequences.
_FAR = 2**40


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
    """The shape a caller passes for a head-major ``shape4``: a 2-D input is one head's
    ``(N, D)`` in either layout (``ferroattn.attention``'s rule)."""
    b, h, n, d = shape4
    if rank == 2:
        return (n, d)
    full = (b, h, n, d) if layout == "bhsd" else (b, n, h, d)
    return full[4 - rank :]


def draw_rank(draw, dims: dict[str, int]) -> int:
    if dims["B"] != 1 or not chance(draw, 0.3):
        return 4
    hq = dims["Hkv"] * dims["G"]
    return 2 if hq == 1 and dims["Hkv"] == 1 and chance(draw, 0.5) else 3


def qkv_args(draw, dims, odd, *, rank, layout, dtype, with_v=True, huge_names=()) -> dict[str, Arg]:
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
    if (
        x.ndim not in (2, 3, 4)
        or x.dtype.kind not in "fV"
        or x.dtype.kind == "V"
        and (x.dtype.name != "bfloat16")
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
        return pick(
            draw, [lit(np.bool_(True), VALID, True), lit(1, VALID, True), lit(0, VALID, False)]
        )
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
        return lit(
            pick(
                draw,
                [0, -1, -5, (-2, 0), (0, -3), (1, 2, 3), (1,), 2.5, "3", (1.0, 2), (True, 0), True],
            ),
            INVALID,
        )
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
        bad = pick(
            draw,
            [
                lens + [0],
                [-1] * b,
                [nk + 1] * b,
                [[n] for n in lens],
                [float(n) + 0.5 for n in lens],
                "abc",
                [2**70] * b,
            ],
        )
        if bad == [] or (isinstance(bad, list) and bad == lens):
            return lit(lens)
        return lit(bad, INVALID)
    if r == 1:
        return Arg(
            np.asarray(lens, dtype=np.uint64), f"np.asarray({lens!r}, dtype=np.uint64)", VALID, lens
        )
    if r == 2 and b:
        return Arg(np.full(b, 2**64 - 1, np.uint64), f"np.full({b}, 2**64 - 1, np.uint64)", INVALID)
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
        return array_arg(
            draw, (nq, nk), pick(draw, ["complex64", "U3", "object"]), verdict=INVALID, layout="c"
        )
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
        bad = pick(
            draw,
            [
                [float("nan")] * hq,
                [float("inf")] * hq,
                [1.0] * (hq + 1),
                [[1.0]] * max(hq, 1),
                "abc",
            ],
        )
        return lit(bad, INVALID)
    if r == 1 and hq:
        return lit([1e300] * hq, LAX, "extreme")
    if name == "alibi_slopes" and hq and chance(draw, 0.5):
        return Arg(ferroattn.alibi_slopes(hq), f"ferroattn.alibi_slopes({hq})")
    vals = [
        round(draw(st.floats(-3, 3)) if name == "sinks" else draw(st.floats(0, 1)), 3)
        for _ in range(hq)
    ]
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
    code = (
        f"ferroattn.T5Bias({table_code}, bidirectional={bidirectional}, "
        f"max_distance={max_distance!r})"
    )
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
        if chance(draw, 0.5):  # one without the other
            lay.verdict = INVALID
            return {"block_layout": lay}
        return {"block_size": lit(bs, INVALID)}
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
    if (
        r == 3
        and isinstance(q.value, np.ndarray)
        and q.value.shape == shape
        and (q.value.flags.writeable and q.value.size)
    ):
        q.setup, q.code = f"q = {q.code}", "q"
        return Arg(q.value, "q", INVALID, setup=q.setup)
    if r == 4:
        return lit([0.0], INVALID)
    return array_arg(draw, shape, dtype, layout=pick(draw, ["c", "f", "neg", "step", "misaligned"]))


def meanings(args: dict[str, Arg], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: args[k].meaning for k in keys if k in args}


def extreme(args: dict[str, Arg]) -> bool:
    """Options whose exact result the float64 reference cannot give (beyond float32)."""
    return any(isinstance(a.meaning, str) and a.meaning == "extreme" for a in args.values()) or any(
        isinstance(a.value, ferroattn.T5Bias)
        and isinstance(a.value.max_distance, int)
        and a.value.max_distance >= _FAR
        for a in args.values()
    )


# --------------------------------------------------------------------------
# attention / attention_weights
# --------------------------------------------------------------------------

_SCORE_OPTIONS = (
    "causal",
    "window",
    "scale",
    "softcap",
    "kv_lengths",
    "mask",
    "bias",
    "alibi_slopes",
    "sinks",
    "rel_bias",
    "block_layout",
    "block_size",
)


def _attention_like_case(draw, weights: bool) -> Case:
    huge_axes = ("B", "G", "Nq", "Nk") if weights else ("B", "G", "Nq", "Dv")
    dims, odd = draw_dims(draw, huge_axes=huge_axes)
    huge = odd is not None and dims[odd] >= HUGE_SIZES[0]
    layout = pick(draw, ["bhsd", "bshd"])
    rank = 4 if huge else draw_rank(draw, dims)
    dtype = pick(draw, FLOAT_DTYPES + CONVERTED_DTYPES if chance(draw, 0.2) else FLOAT_DTYPES)
    huge_names = {"B": ("q", "k", "v"), "G": ("q",), "Nq": ("q",), "Nk": ("k",), "Dv": ("v",)}
    args = qkv_args(
        draw,
        dims,
        odd,
        rank=rank,
        layout=layout,
        dtype=dtype,
        with_v=not weights,
        huge_names=huge_names.get(odd or "", ()),
    )
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
    few_heads = hq < 2**16  # per-head lists of a huge head count would not fit here
    if few_heads and chance(draw, 0.12):
        args["alibi_slopes"] = per_head_arg(draw, "alibi_slopes", hq)
    if few_heads and chance(draw, 0.12):
        args["sinks"] = per_head_arg(draw, "sinks", hq)
    if few_heads and chance(draw, 0.1):
        args["rel_bias"] = rel_bias_arg(draw, hq)
    if small and chance(draw, 0.1):
        args.update(block_args(draw, hq, nq, nk))
    if layout != "bhsd" or chance(draw, 0.1):
        args["layout"] = (
            lit(layout)
            if chance(draw, 0.95)
            else lit(pick(draw, ["BHSD", "", None, "sbhd"]), INVALID)
        )
    if chance(draw, 0.05):
        args["backend"] = lit(pick(draw, ["gpu", None, 1, "CPU"]), INVALID)
    elif chance(draw, 0.05):
        args["backend"] = lit("cpu")
    return_lse = False
    if not weights:
        if chance(draw, 0.4):
            args["return_lse"] = pick(
                draw,
                [
                    lit(True),
                    lit(False),
                    lit(np.bool_(True), LAX, True),
                    lit(1, LAX, True),
                    lit(None, LAX, False),
                ],
            )
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
    opts = meanings(args, _SCORE_OPTIONS)
    is_extreme = extreme(args)
    dtype = result_dtype(args["q"])
    ref = None if is_extreme else reference_or_none(reference_full, q4, k4, v4, **opts)
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


def _cu_arg(draw, lens: list[int]) -> Arg:
    cu = [0, *np.cumsum(lens).tolist()]
    r = roll(draw, 12)
    if r == 0:
        bad = pick(
            draw,
            [
                cu[1:] or [1],
                [*cu[:-1], cu[-1] + 1],
                [0, 2**64 - 1],
                [],
                [float(c) for c in cu],
                [cu],
                "abc",
                [0, -1, *cu[1:]],
            ],
        )
        if bad == cu:
            return lit(cu)
        return lit(bad, INVALID)
    if r == 1:
        return Arg(np.asarray(cu, np.int32), f"np.asarray({cu!r}, np.int32)", VALID, cu)
    return lit(cu)


def _is_cu(value: Any, total: int) -> bool:
    """Whether ``value`` is a list of ints that starts at 0, never decreases and ends at
    ``total``."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(type(c) is int for c in value)
        and value[0] == 0
        and value[-1] == total
        and all(a <= b for a, b in zip(value, value[1:], strict=False))
    )


def _judge_cu_pair(args: dict[str, Arg], total_q: int, total_k: int) -> None:
    """A drawn "bad" cu_seqlens can still be a valid one (dropping the first entry of
    ``[0, 0]`` gives ``[0]``, no sequences): a pair of valid lists of one length is valid."""
    cq, ck = args["cu_seqlens_q"], args["cu_seqlens_k"]
    if INVALID not in (cq.verdict, ck.verdict):
        return
    if _is_cu(cq.value, total_q) and _is_cu(ck.value, total_k) and len(cq.value) == len(ck.value):
        args["cu_seqlens_q"], args["cu_seqlens_k"] = lit(cq.value), lit(ck.value)


def attention_varlen_case(draw) -> Case:
    dims, odd = draw_dims(draw, huge_axes=())
    n_seq = size(draw, 0, 3)  # no sequences at all: cu_seqlens [0] and an empty result
    lens_q = [draw(st.integers(0, 5)) for _ in range(n_seq)]
    lens_k = [draw(st.integers(0, 5)) for _ in range(n_seq)]
    dims.update(B=1, Nq=sum(lens_q), Nk=sum(lens_k))
    dtype = pick(draw, FLOAT_DTYPES)
    args = qkv_args(
        draw,
        dims,
        odd if odd not in ("B", "Nq", "Nk") else None,
        rank=3,
        layout="bshd",
        dtype=dtype,
    )
    args["cu_seqlens_q"] = _cu_arg(draw, lens_q)
    args["cu_seqlens_k"] = _cu_arg(draw, lens_k)
    if chance(draw, 0.05):
        args["cu_seqlens_k"] = lit([0, *np.cumsum(lens_k).tolist(), sum(lens_k)], INVALID)
    _judge_cu_pair(args, sum(lens_q), sum(lens_k))
    for name, maker, p in (
        ("causal", causal_arg, 0.5),
        ("window", window_arg, 0.3),
        ("scale", scale_arg, 0.2),
        ("softcap", softcap_arg, 0.2),
    ):
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
    opts = meanings(args, ("causal", "window", "scale", "softcap"))
    is_extreme = extreme(args)
    ref = None if is_extreme else reference_or_none(reference_varlen, q, k, v, cq, ck, **opts)

    def check(result):
        out, lse = result if return_lse else (result, None)
        if "out" in args:
            assert out is args["out"].value, "the result is not the out array"
        assert_close(out, None if ref is None else ref[0], result_dtype(args["q"]))
        if ref is not None and return_lse:
            assert_lse(lse, ref[1])

    case.check = check
    return case


TARGETS = {
    "attention": attention_case,
    "attention_weights": attention_weights_case,
    "attention_varlen": attention_varlen_case,
}
