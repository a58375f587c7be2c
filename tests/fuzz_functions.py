"""Bad-input fuzz targets for the other functions: linear_attention, LinearAttentionState,
rope, merge_partials, alibi_slopes, the block layouts and set_num_threads.

Oracles: ``test_linear.reference_linear``, ``test_rope.reference_rope``, and, for the rest,
the documented rules written out below.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from fuzz_attention import (
    HEAD_DIMS,
    as_bhsd,
    consistent,
    draw_dims,
    draw_rank,
    extreme,
    meanings,
    out_arg,
    qkv_args,
    user_shape,
)
from fuzz_inputs import (
    BAD_DTYPES,
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
    call_code,
    chance,
    float_option,
    int_option,
    lit,
    masked,
    pick,
    reference_or_none,
    result_dtype,
    roll,
    size,
)
from hypothesis import strategies as st
from test_linear import reference_linear
from test_rope import reference_rope

import ferroattn

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
    opts = {"causal": causal, **meanings(args, ("feature_map", "eps"))}
    is_extreme = extreme(args)
    ref = None if is_extreme else reference_or_none(reference_linear, q4, k4, v4, **opts)
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
    for a in args.values():
        if a.verdict == LAX and isinstance(a.value, int) and a.value >= 2**31:
            a.meaning = "huge"
        elif a.verdict == LAX and isinstance(a.value, bool):
            a.verdict = INVALID  # documented: ints; bools are refused like everywhere in linear
    values = {n: a.value for n, a in args.items()}
    ctor = Case(
        "LinearAttentionState",
        lambda: ferroattn.LinearAttentionState(**values),
        call_code(
            "ferroattn.LinearAttentionState",
            args,
            ("batch", "heads", "head_dim"),
            assign="state = ",
        ),
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
        shapes = {
            "q": (m["batch"], heads, t, hd),
            "k": (m["batch"], kvh, t, hd),
            "v": (m["batch"], kvh, t, vd),
        }
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
        pos = Arg(
            np.broadcast_to(np.zeros(1, np.int64), (n,)),
            f"np.broadcast_to(np.zeros(1, np.int64), ({n},))",
            LAX,
        )
    elif r == 0:
        pos = array_arg(
            draw, pshape, pick(draw, ["float32", "bool", "complex64"]), verdict=INVALID, layout="c"
        )
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
        args["theta"] = float_option(
            draw,
            [10000.0, 500000.0, 2.0, 1e-3],
            odd=[lit("100", LAX, 100.0), lit(1e-300, LAX, "extreme")],
            bad=[0.0, -1.0, float("nan"), float("inf"), "abc", None],
        )
    if chance(draw, 0.3):
        args["interleaved"] = lit(draw(st.booleans()))
    if chance(draw, 0.3) and d >= 2:
        rds = [x for x in range(2, d + 1, 2)]
        args["rotary_dim"] = (
            lit(pick(draw, rds))
            if chance(draw, 0.8)
            else lit(pick(draw, [0, 1, d + 2, 2.0, True, "2"]), INVALID)
        )
    in_place = False
    if not huge and chance(draw, 0.15):
        if (
            chance(draw, 0.3)
            and isinstance(args["x"].value, np.ndarray)
            and (args["x"].value.flags.writeable)
        ):
            x = args["x"]
            x.setup, x.code = f"x = {x.code}", "x"
            args["out"] = Arg(x.value, "x", VALID, setup=x.setup)  # in place, as documented
            in_place = True
        else:
            args["out"] = out_arg(draw, shape, dtype, Arg(None, "None"))
    values = {k: a.value for k, a in args.items()}
    x_before = None if not in_place else np.array(args["x"].value, copy=True)
    case = Case(
        "rope",
        lambda: ferroattn.rope(**values),
        call_code("ferroattn.rope", args, ("x", "positions")),
        args,
    )
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
    shape = tuple(size(draw, 1, 3) for _ in range(size(draw, 0, 2))) + (
        size(draw, 0, 5),
        size(draw, 1, 6),
    )
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
        args["outputs"] = Arg(
            np.stack([a.value for a in outs]), "np.stack([" + ", ".join(a.code for a in outs) + "])"
        )
        args["lses"] = Arg(
            np.stack([a.value for a in lses]), "np.stack([" + ", ".join(a.code for a in lses) + "])"
        )
    else:
        wrap = tuple if form == "tuple" else list
        args["outputs"] = Arg(
            wrap(a.value for a in outs), "[" + ", ".join(a.code for a in outs) + "]"
        )
        args["lses"] = Arg(wrap(a.value for a in lses), "[" + ", ".join(a.code for a in lses) + "]")
    r = roll(draw, 15)
    if r == 0:
        args["outputs"] = lit(pick(draw, [[], "abc", 5, None]), INVALID)
    elif r == 1:
        args["lses"] = Arg(list(args["lses"].value)[:-1] or [], "lses[:-1]", INVALID)
    elif r == 2:
        bad = array_arg(draw, shape, pick(draw, ["int32", "complex64", "bool"]), layout="c")
        args["outputs"] = Arg(
            [bad.value, *list(args["outputs"].value)[1:]], f"[{bad.code}, ...]", INVALID
        )
    elif r == 3:
        bad = array_arg(draw, (*shape[:-1], shape[-1] + 1), dtype, layout="c")
        args["outputs"] = Arg(
            [*list(args["outputs"].value), bad.value], f"[..., {bad.code}]", INVALID
        )
    elif r == 4:
        bad = array_arg(draw, shape, lse_dtype, layout="c")
        args["lses"] = Arg([bad.value] * parts, f"[{bad.code}] * {parts}", INVALID)
    elif r == 5:
        v = np.full(shape[:-1], pick(draw, [np.inf, np.nan]), np.float32)
        args["lses"] = Arg(
            [v] * parts,
            f"[np.full({shape[:-1]!r}, {v.flat[0] if v.size else 0}, np.float32)] * {parts}",
            LAX,
            "extreme",
        )
    if chance(draw, 0.15):
        out_dtype = dtype if chance(draw, 0.7) else pick(draw, ["float64", "float16"])
        args["out"] = array_arg(
            draw,
            shape,
            out_dtype,
            layout=pick(draw, ["c", "neg", "step"]),
            verdict=VALID if out_dtype == dtype else INVALID,
        )
    values = {k: a.value for k, a in args.items()}
    case = Case(
        "merge_partials",
        lambda: ferroattn.merge_partials(**values),
        call_code("ferroattn.merge_partials", args, ("outputs", "lses")),
        args,
    )
    if case.invalid or extreme(args):
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
    case = Case(
        "alibi_slopes",
        lambda: ferroattn.alibi_slopes(arg.value),
        f"ferroattn.alibi_slopes({arg.code})",
        {"num_heads": arg},
    )
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
        n_arg = lit(pick(draw, [0, -2, 3.0, "4", None]), INVALID)
    elif r == 2:
        n_arg = lit(True, LAX, 1)
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
                args["seed"] = (
                    lit(pick(draw, [0, 7, 2**40]))
                    if chance(draw, 0.8)
                    else lit(pick(draw, [-1, "x", 1.5]), INVALID)
                )
    if chance(draw, 0.4):
        args["causal"] = lit(draw(st.booleans()))
    fn = getattr(ferroattn, func)
    values = {k: a.value for k, a in args.items()}
    case = Case(
        func, lambda: fn(**values), call_code("ferroattn." + func, args, ("n_blocks",)), args
    )
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
            if not causal:
                seen = result.sum(axis=1)
                assert (seen >= picks).all(), "a row has fewer than random_blocks blocks"
            assert (fn(**values) == result).all(), "not deterministic for one seed"
        else:
            assert (result == want).all(), (
                f"differs from the rule at {np.argwhere(result != want)[:3].tolist()}"
            )

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

    return Case(
        "set_num_threads", call, f"ferroattn.set_num_threads({arg.code})", {"n": arg}, check=check
    )


TARGETS = {
    "linear_attention": linear_attention_case,
    "LinearAttentionState": linear_state_cases,
    "rope": rope_case,
    "merge_partials": merge_partials_case,
    "alibi_slopes": alibi_slopes_case,
    "layouts": layout_case,
    "set_num_threads": set_num_threads_case,
}
