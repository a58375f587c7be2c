"""Bad-input fuzz targets for the stateful objects: KVCache and SelfAttention.

A KVCache case is its constructor with drawn arguments, a valid prefill, then one method call
with drawn (often odd) arguments, judged against ``test_cache_model.CacheModel``; a refused
call must leave lengths, keys() and values() as they were. A SelfAttention case is its
constructor, ``forward`` against ``test_layer.reference_layer`` and ``step`` through a cache
(any split of the sequence equals one causal forward).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fuzz_attention import (
    _NotT5,
    per_head_arg,
    rel_bias_arg,
    scale_arg,
    softcap_arg,
    window_arg,
)
from fuzz_inputs import (
    BAD_DTYPES,
    FLOAT_DTYPES,
    INVALID,
    LAX,
    VALID,
    Arg,
    Case,
    array_arg,
    as_f64,
    assert_close,
    build,
    call_code,
    chance,
    int_option,
    junk_arg,
    lit,
    pick,
    roll,
    size,
)
from hypothesis import strategies as st
from test_cache_model import CacheModel, Config
from test_layer import make_params, reference_layer

import ferroattn

# --------------------------------------------------------------------------
# KVCache
# --------------------------------------------------------------------------


def _cache_config(draw) -> tuple[dict[str, Arg], Config | None]:
    """Constructor arguments and, when they are valid, the model's configuration."""
    b, h, d = size(draw, 1, 2), size(draw, 1, 2), pick(draw, [1, 3, 8, 16])
    args = {
        "batch": int_option(draw, [b]),
        "kv_heads": int_option(draw, [h]),
        "head_dim": int_option(draw, [d]),
    }
    windowed = chance(draw, 0.4)
    if windowed:
        args["window"] = int_option(draw, [1, 2, 3, 5], none_ok=True)
        if chance(draw, 0.5):
            args["sinks"] = int_option(draw, [0, 1, 2])
        if chance(draw, 0.5):
            args["max_rollback"] = int_option(draw, [0, 1, 2])
        if chance(draw, 0.1):
            args["capacity"] = lit(pick(draw, [8, None]))
    else:
        args["capacity"] = int_option(draw, [4, 8, 12])
        if chance(draw, 0.05):
            args[pick(draw, ["sinks", "max_rollback"])] = lit(1, INVALID)
    if chance(draw, 0.4):
        args["dtype"] = lit(pick(draw, ["float32", "float16", "bfloat16", "int8"]))
        if chance(draw, 0.2):
            args["dtype"] = pick(
                draw,
                [
                    lit(np.float16, VALID, "float16"),
                    lit(5, INVALID),
                    lit("int4", INVALID),
                    lit("float64", INVALID),
                    lit(None, INVALID),
                ],
            )
    if chance(draw, 0.3):
        args["value_dim"] = int_option(draw, [1, 4, 8], none_ok=True)
    if chance(draw, 0.1):
        args["device"] = (
            lit(pick(draw, [None, "cpu"]))
            if chance(draw, 0.5)
            else lit(pick(draw, [7, "cpux", 1.5]), INVALID)
        )
    m = {k: a.meaning for k, a in args.items()}
    verdicts = {a.verdict for a in args.values()}
    if INVALID in verdicts or any(
        a.verdict == LAX and not isinstance(a.value, bool) for a in args.values()
    ):
        return args, None
    if any(m.get(k) is not None and m[k] < 1 for k in ("batch", "kv_heads", "head_dim", "window")):
        return args, None
    window = m.get("window")
    cfg = Config(
        m["batch"],
        m["kv_heads"],
        m["head_dim"],
        m.get("value_dim") or m["head_dim"],
        None if window else m.get("capacity"),
        window,
        m.get("sinks", 0),
        m.get("max_rollback", 0),
        m.get("dtype", "float32"),
    )
    if window is None and (cfg.capacity is None or cfg.sinks or cfg.max_rollback):
        return args, None  # neither a capacity nor a window; sinks without a window
    return args, cfg


def _snapshot(cache) -> tuple:
    return (
        cache.lengths.tolist(),
        [np.array(cache.keys(b)) for b in range(cache.batch)],
        [np.array(cache.values(b)) for b in range(cache.batch)],
    )


def _unchanged(cache, before) -> None:
    after = _snapshot(cache)
    assert after[0] == before[0], f"lengths {before[0]} -> {after[0]}"
    for name, x, y in (("keys", before[1], after[1]), ("values", before[2], after[2])):
        for b, (u, w) in enumerate(zip(x, y, strict=True)):
            assert u.shape == w.shape and np.array_equal(u, w, equal_nan=True), f"{name}({b})"


def _assert_storage(cache, model: CacheModel) -> None:
    assert cache.lengths.tolist() == model.lengths, (cache.lengths.tolist(), model.lengths)
    for b in range(model.cfg.batch):
        pos = model.stored(b)
        for name, got, hist in (
            ("keys", cache.keys(b), model.k),
            ("values", cache.values(b), model.v),
        ):
            want = hist[b][:, pos]
            assert np.shape(got) == want.shape and np.array_equal(as_f64(got), want), (
                f"{name}({b}) differ from the model (positions {pos})"
            )


def _lengths_arg(draw, batch: int, t: int) -> Arg:
    r = roll(draw, 10)
    lens = [draw(st.integers(0, t)) for _ in range(batch)]
    if r == 0:
        return lit(
            pick(
                draw,
                [
                    [t + 1] * batch,
                    [-1] * batch,
                    lens + [0],
                    [float(x) for x in lens],
                    "abc",
                    [2**70] * batch,
                ],
            ),
            INVALID,
        )
    if r == 1:
        return Arg(np.asarray(lens, np.uint8), f"np.asarray({lens!r}, np.uint8)", VALID, lens)
    return lit(lens)


def _kv_arg(draw, shape, dtype) -> Arg:
    r = roll(draw, 15)
    if r == 0:
        return array_arg(draw, shape, pick(draw, BAD_DTYPES), verdict=INVALID, layout="c")
    if r == 1:
        return junk_arg(draw)
    if r == 2:
        s = list(shape)
        s[pick(draw, [0, 1, 3])] += 1
        return array_arg(draw, tuple(s), dtype, verdict=INVALID)
    return array_arg(draw, shape, dtype, allow_list=False)


def _score_args(draw, h: int) -> dict[str, Arg]:
    args = {}
    if chance(draw, 0.2):
        args["scale"] = scale_arg(draw)
    if chance(draw, 0.2):
        args["softcap"] = softcap_arg(draw)
    if chance(draw, 0.1):
        args["alibi_slopes"] = per_head_arg(draw, "alibi_slopes", h)
    if chance(draw, 0.1):
        args["sinks"] = per_head_arg(draw, "sinks", h)
    if chance(draw, 0.08):
        args["rel_bias"] = rel_bias_arg(draw, h)
    return args


def kv_cache_cases(draw):
    args, cfg = _cache_config(draw)
    values = {k: a.value for k, a in args.items()}
    holder: dict[str, Any] = {}

    def make():
        holder["cache"] = ferroattn.KVCache(**values)
        return holder["cache"]

    ctor = Case(
        "KVCache",
        make,
        call_code("ferroattn.KVCache", args, ("batch", "kv_heads", "head_dim"), assign="cache = "),
        args,
    )
    # A refusal of the shape of the storage may name any of its parts.
    ctor.extra_blame = tuple(
        n for n in ("capacity", "window", "sinks", "max_rollback") if n in args or n == "capacity"
    )
    if cfg is None and not ctor.invalid and not any(a.verdict != VALID for a in args.values()):
        ctor.must_fail = True
    if cfg is not None:

        def check(cache):
            assert cache.lengths.tolist() == [0] * cfg.batch
            assert cache.dtype == cfg.dtype and cache.value_dim == cfg.value_dim

        ctor.check = check
    yield ctor
    if cfg is None or "cache" not in holder:
        return
    cache, model = holder["cache"], CacheModel(cfg)
    seed, t0 = draw(st.integers(0, 2**16)), size(draw, 0, 3)
    shape_k = (cfg.batch, cfg.kv_heads, t0, cfg.head_dim)
    shape_v = (cfg.batch, cfg.kv_heads, t0, cfg.value_dim)
    k0, v0 = build(shape_k, seed=seed), build(shape_v, seed=seed + 1)
    prefill = ""
    if model.room([t0] * cfg.batch):
        cache.append(k0, v0)
        model.append(k0, v0, [t0] * cfg.batch)
        prefill = (
            f"\ncache.append(build({shape_k!r}, seed={seed}), build({shape_v!r}, seed={seed + 1}))"
        )
    method = pick(draw, ["append", "attend", "step", "step", "rollback", "reset", "keys"])
    yield _method_case(draw, cache, model, method, args, prefill)


def _method_case(draw, cache, model: CacheModel, method: str, ctor_args, prefill: str) -> Case:
    cfg = model.cfg
    setup = (
        call_code(
            "ferroattn.KVCache", ctor_args, ("batch", "kv_heads", "head_dim"), assign="cache = "
        )
        + prefill
    )
    t = size(draw, 0, 3) if method == "append" else size(draw, 1, 3)
    heads = cfg.kv_heads * size(draw, 1, 2) if not chance(draw, 0.05) else 0
    dtype = pick(draw, FLOAT_DTYPES)
    args: dict[str, Arg] = {}
    if method in ("attend", "step"):
        args["q"] = _kv_arg(draw, (cfg.batch, heads, t, cfg.head_dim), dtype)
        if heads == 0:
            args["q"].verdict = LAX
    if method in ("append", "step"):
        args["k"] = _kv_arg(draw, (cfg.batch, cfg.kv_heads, t, cfg.head_dim), dtype)
        args["v"] = _kv_arg(draw, (cfg.batch, cfg.kv_heads, t, cfg.value_dim), dtype)
    if method in ("append", "attend", "step") and chance(draw, 0.3):
        args["lengths"] = _lengths_arg(draw, cfg.batch, t)
    if method in ("attend", "step"):
        args.update(_score_args(draw, heads))
    if method == "rollback":
        args["n"] = int_option(draw, [0, 1, 2])
        if chance(draw, 0.5):
            args["seq"] = int_option(draw, list(range(cfg.batch)))
    if method in ("reset", "keys") and chance(draw, 0.8):
        args["seq"] = int_option(draw, list(range(cfg.batch)))
        if method == "keys" and "seq" not in args:
            args["seq"] = lit(0)
    if method == "keys" and "seq" not in args:
        args["seq"] = lit(0)
    values = {k: a.value for k, a in args.items()}
    fn = getattr(cache, method)
    before = _snapshot(cache)
    pos = {
        "append": ("k", "v"),
        "attend": ("q",),
        "step": ("q", "k", "v"),
        "rollback": ("n",),
        "keys": ("seq",),
    }.get(method, ())
    case = Case(
        f"KVCache.{method}",
        lambda: fn(**values),
        setup + "\n" + call_code("cache." + method, args, pos),
        args,
        after_error=lambda: _unchanged(cache, before),
    )
    if method in ("attend", "step", "append"):
        # Refusals about the cache's state (its capacity, what a window cache can still
        # answer) are about the tokens asked for.
        case.extra_blame = ("q", "lengths", "capacity") if method != "append" else ("capacity",)
    if case.invalid or any(
        a.verdict == LAX and not isinstance(a.value, bool) for n, a in args.items() if n != "q"
    ):
        return case
    m = {k: a.meaning for k, a in args.items()}
    batch_all = list(range(cfg.batch))
    if method in ("rollback", "reset", "keys"):
        seq = m.get("seq")
        if seq is not None and not 0 <= seq < cfg.batch:
            case.must_fail = True
            return case
        seqs = batch_all if seq is None else [seq]
        if method == "rollback":
            if m["n"] < 0 or not model.can_roll_back(m["n"], seqs):
                case.must_fail = True
                case.extra_blame = ("n",)
                return case

            def check_rollback(_):
                model.rollback(m["n"], seqs)
                _assert_storage(cache, model)

            case.check = check_rollback
        elif method == "reset":

            def check_reset(_):
                model.reset(seqs)
                _assert_storage(cache, model)

            case.check = check_reset
        else:

            def check_keys(got):
                want = model.k[seq][:, model.stored(seq)]
                assert np.shape(got) == want.shape and np.array_equal(as_f64(got), want)

            case.check = check_keys
        return case
    counts = m.get("lengths") or [t] * cfg.batch
    opts = {k: m[k] for k in ("scale", "softcap", "alibi_slopes", "sinks", "rel_bias") if k in m}
    if any(isinstance(v, str) and v == "extreme" for v in opts.values()):
        return case
    if method == "append":
        if not model.room(counts):
            case.must_fail, case.extra_blame = True, ("capacity", "k")
            return case

        def check_append(result):
            assert result is None
            model.append(as_f64(values["k"]), as_f64(values["v"]), counts)
            _assert_storage(cache, model)

        case.check = check_append
        return case
    refused = model.refuses_terms(opts) or not (
        model.attend_allowed(counts) if method == "attend" else model.step_allowed(counts)
    )
    if refused:
        case.must_fail = True
        case.extra_blame = ("q", "lengths", "alibi_slopes", "rel_bias", "capacity", "k")
        return case
    q = as_f64(values["q"])

    def check_attention(result):
        if method == "step":
            model.append(as_f64(values["k"]), as_f64(values["v"]), counts)
        want = model.attention(q, counts, opts)
        assert_close(result, want if heads else None, np.asarray(values["q"]).dtype)
        if not heads:
            assert result.shape == want.shape, result.shape
        _assert_storage(cache, model)

    case.check = check_attention
    return case


# --------------------------------------------------------------------------
# SelfAttention
# --------------------------------------------------------------------------


def self_attention_cases(draw):
    h_kv = size(draw, 1, 2)
    h = h_kv * size(draw, 1, 2)
    rope = chance(draw, 0.5)
    hd = pick(draw, [2, 4, 8]) if rope else pick(draw, [1, 3, 4, 8])
    d_model = size(draw, 1, 12)
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    with_bias = chance(draw, 0.4)
    params = make_params(rng, d_model, h, h_kv, hd, bias=with_bias)
    setup = (
        f"params = make_params(np.random.default_rng({seed}), {d_model}, {h}, {h_kv}, {hd}, "
        f"bias={with_bias})  # from test_layer"
    )
    args: dict[str, Arg] = {}
    for name, w in params.items():
        dt = pick(draw, ["float32", "float32", "float64", "float16"])
        w_arg = Arg(w.astype(dt), f"params[{name!r}].astype({dt!r})", setup=setup)
        r = roll(draw, 30)
        if r == 0:
            w_arg = Arg(
                w[:-1] if w.shape[0] > 1 else w[:0], f"params[{name!r}][:-1]", INVALID, setup=setup
            )
        elif r == 1:
            w_arg = Arg(w.astype(np.int32), f"params[{name!r}].astype(np.int32)", INVALID)
        elif r == 2:
            w_arg = junk_arg(draw)
            if name.startswith("b_") and w_arg.value is None:
                w_arg = lit(None)  # a bias of None is no bias
        args[name] = w_arg
    args["num_heads"] = int_option(draw, [h])
    if chance(draw, 0.5):
        # None means num_heads: valid where that is the drawn number of KV heads.
        args["num_kv_heads"] = int_option(draw, [h_kv], none_ok=True)
        if args["num_kv_heads"].value is None and h_kv != h:
            args["num_kv_heads"] = lit(None, INVALID)
    elif h_kv != h:
        args["num_kv_heads"] = lit(h_kv)
    if chance(draw, 0.2):
        args["head_dim"] = int_option(draw, [hd])
    causal = draw(st.booleans())
    args["causal"] = lit(causal)
    odd_rope = False
    if rope:
        args["rope_theta"] = lit(pick(draw, [10000.0, 500000.0, 100.0]))
        if chance(draw, 0.1):
            args["rope_theta"] = lit(pick(draw, [0.0, -1.0, float("nan"), "x"]), INVALID)
        args["rope_interleaved"] = lit(draw(st.booleans()))
    elif chance(draw, 0.05):
        args["rope_theta"] = lit(10000.0, INVALID if hd % 2 else VALID)
        odd_rope = bool(hd % 2)
    if chance(draw, 0.25):
        args["window"] = window_arg(draw)
    if chance(draw, 0.2):
        args["softcap"] = softcap_arg(draw)
    if chance(draw, 0.2):
        args["scale"] = scale_arg(draw)
    # Where RoPE meets an odd head dimension, the refusal is about head_dim (not passed); a
    # weight of the wrong shape may be reported by the weight it disagrees with.
    extra_blame = ("head_dim",) if odd_rope else ()
    if any(args[n].verdict != VALID for n in (*params, "num_kv_heads") if n in args):
        extra_blame += tuple(params) + ("num_heads", "num_kv_heads", "head_dim")
    if chance(draw, 0.05):
        args["sinks"] = per_head_arg(draw, "sinks", h + 1)
        args["sinks"].verdict = INVALID
    if chance(draw, 0.03):
        args["rel_bias"] = Arg(_NotT5(), "_NotT5()", INVALID)
    values = {k: a.value for k, a in args.items()}
    holder: dict[str, Any] = {}

    def make():
        holder["layer"] = ferroattn.SelfAttention(**values)
        return holder["layer"]

    pos = ("w_q", "w_k", "w_v", "w_o")
    ctor = Case(
        "SelfAttention",
        make,
        call_code("ferroattn.SelfAttention", args, pos, assign="layer = "),
        args,
        extra_blame=extra_blame,
    )
    yield ctor
    if "layer" not in holder or ctor.invalid:
        return
    if any(a.verdict == LAX for a in args.values()):
        return
    layer = holder["layer"]
    m = {k: a.meaning for k, a in args.items()}
    if any(isinstance(v, str) and v == "extreme" for v in m.values()):
        return
    opts = {
        k: m[k]
        for k in ("causal", "rope_theta", "rope_interleaved", "window", "softcap", "scale")
        if k in m
    }
    ref_params = {
        k: None if v is None else as_f64(v) for k, v in values.items() if k.startswith(("w_", "b_"))
    }
    b, n = size(draw, 1, 2), size(draw, 0, 6)
    x_arg = array_arg(draw, (b, n, d_model), pick(draw, FLOAT_DTYPES), allow_list=False)
    r = roll(draw, 15)
    if r == 0:
        x_arg = array_arg(draw, (b, n, d_model + 1), "float32", verdict=INVALID)
    elif r == 1:
        x_arg = array_arg(
            draw, (b, n, d_model), pick(draw, ["int32", "complex64"]), verdict=INVALID, layout="c"
        )
    fwd = Case(
        "SelfAttention.forward",
        lambda: layer.forward(x_arg.value),
        f"layer.forward({x_arg.code})",
        {"x": x_arg},
    )
    if not fwd.invalid and n:
        want = reference_layer(
            as_f64(x_arg.value), ref_params, num_heads=h, num_kv_heads=h_kv, **opts
        )

        def check(result, want=want):
            assert_close(result, want, np.asarray(x_arg.value).dtype)

        fwd.check = check
    yield fwd
    if not causal or fwd.invalid or n == 0:
        return
    cache_args = {"batch": lit(b), "capacity": lit(n + size(draw, 0, 2))}
    if chance(draw, 0.3):
        cache_args["dtype"] = lit(pick(draw, ["float16", "bfloat16"]))
    cache = layer.new_cache(**{k: a.value for k, a in cache_args.items()})
    cut = draw(st.integers(1, n))
    x = np.asarray(x_arg.value)

    def stepped():
        return np.concatenate([layer.step(x[:, :cut], cache), layer.step(x[:, cut:], cache)], 1)

    low = "dtype" in cache_args
    case = Case(
        "SelfAttention.step",
        stepped,
        f"cache = layer.new_cache({', '.join(f'{k}={a.code}' for k, a in cache_args.items())})"
        f"\nlayer.step(x[:, :{cut}], cache); layer.step(x[:, {cut}:], cache)",
        {"x": x_arg},
    )

    def check_step(result):
        full = reference_layer(as_f64(x), ref_params, num_heads=h, num_kv_heads=h_kv, **opts)
        if low:  # keys and values rounded to the cache's 16-bit storage
            err = np.linalg.norm(as_f64(result) - full) / max(np.linalg.norm(full), 1e-30)
            assert err <= 2e-2, f"relative error {err:.3g}"
        else:
            assert_close(result, full, x.dtype)

    case.check = check_step
    yield case


TARGETS = {"KVCache": kv_cache_cases, "SelfAttention": self_attention_cases}
