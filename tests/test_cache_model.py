"""KVCache against a plain-Python model of what it must hold (a hypothesis state machine).

Any sequence of ``append`` / ``attend`` / ``step`` (valid inputs, and inputs that must be
refused), ``rollback``, ``reset`` and reads must leave ``lengths``, ``keys()`` and ``values()``
exactly as :class:`CacheModel` predicts (it applies the same storage rounding: float16 /
bfloat16 casts, the plain int8 rounding of ``test_kv_cache``), attention must equal the float64
reference over the keys the model says are visible, and a call that fails must change nothing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from reference import BF16, reference, rel_err
from test_kv_cache import _plain_int8

import ferroattn

F32 = np.float32
STORAGE = {"float32": np.dtype(F32), "float16": np.dtype(np.float16), "bfloat16": BF16}


@dataclass(frozen=True)
class Config:
    batch: int
    kv_heads: int
    head_dim: int
    value_dim: int
    capacity: int | None
    window: int | None
    sinks: int
    max_rollback: int
    dtype: str

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"dtype": self.dtype, "value_dim": self.value_dim}
        if self.window is None:
            kw["capacity"] = self.capacity
        else:
            kw.update(window=self.window, sinks=self.sinks, max_rollback=self.max_rollback)
        return kw


class CacheModel:
    """What a KVCache holds, from its documentation: per sequence the history of stored tokens
    (after the storage's rounding) and, for a window cache, which position each ring slot holds
    (sinks first, then ``window + max_rollback`` slots reused in turn)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.ring = 0 if cfg.window is None else cfg.window + cfg.max_rollback
        self.k = [np.zeros((cfg.kv_heads, 0, cfg.head_dim)) for _ in range(cfg.batch)]
        self.v = [np.zeros((cfg.kv_heads, 0, cfg.value_dim)) for _ in range(cfg.batch)]
        self.held: list[dict[int, int]] = [{} for _ in range(cfg.batch)]

    @property
    def lengths(self) -> list[int]:
        return [k.shape[1] for k in self.k]

    # storage
    def encode(self, x: Any) -> np.ndarray:
        """Tokens ``(..., dim)`` as the storage keeps them, in float64."""
        if self.cfg.dtype == "int8":
            q, scale = _plain_int8(np.asarray(x, dtype=F32))
            return (q.astype(F32) * scale[..., None]).astype(np.float64)
        return np.asarray(x).astype(STORAGE[self.cfg.dtype]).astype(np.float64)

    def slot(self, p: int) -> int:
        s = self.cfg.sinks
        return p if p < s else s + (p - s) % self.ring

    def is_held(self, b: int, p: int) -> bool:
        if not 0 <= p < self.lengths[b]:
            return False
        return self.cfg.window is None or p < self.cfg.sinks or self.held[b].get(self.slot(p)) == p

    def stored(self, b: int) -> list[int]:
        """Positions of sequence ``b`` still in storage, in order."""
        n, s = self.lengths[b], self.cfg.sinks
        if self.cfg.window is None:
            return list(range(n))
        tail = range(max(s, n - self.ring), n)
        return list(range(min(n, s))) + [p for p in tail if self.is_held(b, p)]

    def append(self, k: np.ndarray, v: np.ndarray, counts: list[int]) -> None:
        ek, ev = self.encode(k), self.encode(v)
        for b, t in enumerate(counts):
            start = self.lengths[b]
            self.k[b] = np.concatenate([self.k[b], ek[b, :, :t]], axis=1)
            self.v[b] = np.concatenate([self.v[b], ev[b, :, :t]], axis=1)
            if self.cfg.window is not None:
                for p in range(start, start + t):
                    self.held[b][self.slot(p)] = p

    def rollback(self, n: int, seqs: list[int]) -> None:
        for b in seqs:
            m = self.lengths[b] - n
            self.k[b], self.v[b] = self.k[b][:, :m], self.v[b][:, :m]

    def reset(self, seqs: list[int]) -> None:
        for b in seqs:
            self.k[b], self.v[b] = self.k[b][:, :0], self.v[b][:, :0]
            self.held[b] = {}

    # rules
    def room(self, counts: list[int]) -> bool:
        cap = self.cfg.capacity
        return cap is None or all(n + t <= cap for n, t in zip(self.lengths, counts, strict=True))

    def needed(self, b: int, first: int) -> list[int]:
        """Stored positions the queries from position ``first`` on read (window caches)."""
        w, s = self.cfg.window, self.cfg.sinks
        assert w is not None
        lo = max(s, first - (w - 1))
        return list(range(min(s, self.lengths[b]))) + list(range(lo, self.lengths[b]))

    def can_roll_back(self, n: int, seqs: list[int]) -> bool:
        for b in seqs:
            if n > self.lengths[b]:
                return False
            if self.cfg.window is not None:
                new = self.lengths[b] - n
                w, s = self.cfg.window, self.cfg.sinks
                if not all(self.is_held(b, p) for p in range(max(s, new - (w - 1)), new)):
                    return False
        return True

    def attend_allowed(self, counts: list[int]) -> bool:
        """A window cache answers at most ``max_rollback + 1`` queries after an append, and
        only while every key they read is stored."""
        if self.cfg.window is None:
            return True
        if max(counts) > self.cfg.max_rollback + 1:
            return False
        return all(
            self.is_held(b, p)
            for b, (n, c) in enumerate(zip(self.lengths, counts, strict=True))
            for p in self.needed(b, n - c)
        )

    def step_allowed(self, counts: list[int]) -> bool:
        if not self.room(counts):
            return False
        if self.cfg.window is None:
            return True
        return all(
            self.is_held(b, p) for b, n in enumerate(self.lengths) for p in self.needed(b, n)
        )

    def refuses_terms(self, opts: dict[str, Any]) -> bool:
        """ALiBi and T5 biases need contiguous positions: not with the sinks of a window."""
        positional = opts.get("alibi_slopes") is not None or opts.get("rel_bias") is not None
        return positional and self.cfg.window is not None and self.cfg.sinks > 0

    def attention(self, q: np.ndarray, counts: list[int], opts: dict[str, Any]) -> np.ndarray:
        """float64 attention of ``q`` ``(B, H, T, D)``: row ``i < counts[b]`` of sequence ``b``
        is the query at position ``length - counts[b] + i`` and sees the keys at positions
        ``j <= p`` (and, in a window cache, ``j > p - window`` or ``j < sinks``); other rows
        are zero. The float64 reference computes it, with those keys as a mask."""
        q = np.asarray(q, dtype=np.float64)
        out = np.zeros((*q.shape[:3], self.cfg.value_dim))
        w, s = self.cfg.window, self.cfg.sinks
        for b, t in enumerate(counts):
            n = self.lengths[b]
            if t == 0 or q.shape[1] == 0:
                continue
            p, j = np.arange(n - t, n)[:, None], np.arange(n)[None, :]
            visible = j <= p
            if w is not None:
                visible &= (j > p - w) | (j < s)
            o, _, _ = reference(
                q[b : b + 1, :, :t], self.k[b][None], self.v[b][None], mask=visible, **opts
            )
            out[b, :, :t] = o[0]
        return out


# --------------------------------------------------------------------------
# Drawing inputs
# --------------------------------------------------------------------------

# Options that must be refused, with the argument a refusal names.
BAD_OPTIONS = [
    ({"scale": float("nan")}, "scale"),
    ({"scale": "big"}, "scale"),
    ({"softcap": 0.0}, "softcap"),
    ({"softcap": -2.0}, "softcap"),
    ({"sinks": "nan"}, "sinks"),
    ({"sinks": "short"}, "sinks"),
    ({"alibi_slopes": "nan"}, "alibi_slopes"),
    ({"alibi_slopes": "long"}, "alibi_slopes"),
    ({"rel_bias": "table"}, "rel_bias"),
    ({"rel_bias": "type"}, "rel_bias"),
]


def _per_head(kind: str, h: int, rng) -> Any:
    if kind == "nan":
        return [float("nan")] * h
    if kind == "short":
        return [0.0] * max(h - 1, 0) if h > 1 else []
    if kind == "long":
        return [0.5] * (h + 1)
    return rng.uniform(0.0, 1.0, h).round(3).tolist()


def _names(message: str, name: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message) is not None


class KVCacheMachine(RuleBasedStateMachine):
    """Random calls on one cache, each checked against :class:`CacheModel`."""

    cache: Any
    model: CacheModel

    @initialize(
        cfg=st.builds(
            lambda b, h, d, dv, windowed, cap, w, s, r, dt: Config(
                b,
                h,
                d,
                dv,
                None if windowed else cap,
                w if windowed else None,
                s if windowed else 0,
                r if windowed else 0,
                dt,
            ),
            st.integers(1, 2),
            st.integers(1, 2),
            st.sampled_from([1, 3, 8, 16]),
            st.sampled_from([1, 4, 8]),
            st.booleans(),
            st.integers(1, 12),
            st.integers(1, 5),
            st.integers(0, 2),
            st.integers(0, 2),
            st.sampled_from(["float32", "float16", "bfloat16", "int8"]),
        ),
        seed=st.integers(0, 2**16),
    )
    def make(self, cfg: Config, seed: int) -> None:
        self.cfg = cfg
        self.cache = ferroattn.KVCache(cfg.batch, cfg.kv_heads, cfg.head_dim, **cfg.kwargs())
        self.model = CacheModel(cfg)
        self.rng = np.random.default_rng(seed)

    # -- inputs
    def _tokens(self, t: int, dim: int, dtype: Any, heads: int | None = None) -> np.ndarray:
        h = self.cfg.kv_heads if heads is None else heads
        x = self.rng.standard_normal((self.cfg.batch, h, t, dim))
        return x.astype(F32).astype(dtype)

    def _draw_options(self, data, h: int) -> tuple[dict[str, Any], str | None]:
        """Score options (valid, or one that must be refused: its name)."""
        opts: dict[str, Any] = {}
        if h and data.draw(st.integers(0, 5), label="bad option") == 0:
            bad, name = data.draw(st.sampled_from(BAD_OPTIONS), label="bad")
            for key, val in bad.items():
                if key in ("sinks", "alibi_slopes"):
                    val = _per_head(val, h, self.rng)
                elif key == "rel_bias":
                    table = np.zeros((8, h + 1), F32)
                    val = ferroattn.T5Bias(table) if val == "table" else {"table": table}
                opts[key] = val
            return opts, name
        if data.draw(st.booleans(), label="scale"):
            opts["scale"] = data.draw(st.sampled_from([0.3, 1.0, 0.0]), label="scale value")
        if data.draw(st.booleans(), label="softcap"):
            opts["softcap"] = data.draw(st.sampled_from([0.5, 3.0]), label="softcap value")
        term = data.draw(st.sampled_from([None, None, "alibi", "sinks", "rel"]), label="term")
        if term == "alibi":
            opts["alibi_slopes"] = _per_head("ok", h, self.rng)
        elif term == "sinks":
            opts["sinks"] = self.rng.normal(0, 2, h).round(3).tolist()
        elif term == "rel":
            table = self.rng.standard_normal((8, h)).astype(F32)
            opts["rel_bias"] = ferroattn.T5Bias(table, bidirectional=False, max_distance=12)
        return opts, None

    def _draw_counts(self, data, t: int) -> tuple[list[int] | None, bool]:
        """``lengths=`` (None: all ``t``) and whether it is valid."""
        r = data.draw(st.integers(0, 5), label="lengths kind")
        if r < 3:
            return None, True
        if r == 5:
            bad = [t + 1] * self.cfg.batch if t >= 0 else [-1] * self.cfg.batch
            return bad, False
        lens = [data.draw(st.integers(0, t), label="length") for _ in range(self.cfg.batch)]
        return lens, True

    def _q(self, data, t: int) -> tuple[np.ndarray, str]:
        """Queries: valid, or with zero heads (either outcome), or the wrong shape (refused);
        at times misaligned or non-contiguous (copied: valid)."""
        group = data.draw(st.integers(1, 2), label="group")
        dtype = data.draw(st.sampled_from([F32, F32, np.float16, np.float64]), label="q dtype")
        kind = data.draw(
            st.sampled_from(["ok"] * 8 + ["zero_heads", "bad_dim", "misaligned", "strided"]),
            label="q kind",
        )
        if kind == "zero_heads":
            return np.zeros((self.cfg.batch, 0, t, self.cfg.head_dim), dtype), "either"
        if kind == "bad_dim":
            return self._tokens(t, self.cfg.head_dim + 1, dtype, self.cfg.kv_heads), "fail"
        q = self._tokens(t, self.cfg.head_dim, dtype, self.cfg.kv_heads * group)
        if kind == "misaligned" and q.dtype.itemsize > 1:
            raw = np.zeros(q.nbytes + 1, np.uint8)
            m = raw[1:].view(q.dtype).reshape(q.shape)
            m[...] = q
            q = m
        elif kind == "strided":
            wide = np.zeros((*q.shape[:-1], 2 * q.shape[-1]), q.dtype)
            wide[..., ::2] = q
            q = wide[..., ::2]
        return q, "ok"

    # -- the calls
    def _expect_fail(self, fn, name: str | None) -> None:
        try:
            fn()
        except (ValueError, TypeError) as err:
            if name is not None:
                assert _names(str(err), name), f"the error does not name {name}: {err}"
            return
        raise AssertionError("the call should have been refused")

    def _check(self, got: np.ndarray, want: np.ndarray, q: np.ndarray) -> None:
        assert isinstance(got, np.ndarray) and got.dtype == q.dtype, (type(got), got.dtype)
        assert got.shape == want.shape, (got.shape, want.shape)
        tol = 2e-3 if self.cfg.dtype == "int8" or q.dtype == np.float16 else 1e-4
        err = rel_err(got, want)
        assert err <= tol, f"attention off the model by {err:.3g}"

    @rule(data=st.data())
    def append(self, data) -> None:
        t = data.draw(st.integers(0, 4), label="tokens")
        dtype = data.draw(st.sampled_from([F32, np.float16, np.float64]), label="kv dtype")
        k = self._tokens(t, self.cfg.head_dim, dtype)
        v = self._tokens(t, self.cfg.value_dim, dtype)
        counts, ok = self._draw_counts(data, t)
        if data.draw(st.integers(0, 7), label="bad kv") == 0:
            v = self._tokens(t + 1, self.cfg.value_dim, dtype)
            ok = False
        each = [t] * self.cfg.batch if counts is None else counts
        kwargs = {} if counts is None else {"lengths": counts}
        if not ok or not self.model.room(each):
            self._expect_fail(lambda: self.cache.append(k, v, **kwargs), None)
            return
        self.cache.append(k, v, **kwargs)
        self.model.append(k, v, each)

    @rule(data=st.data())
    def attend(self, data) -> None:
        t = data.draw(st.integers(1, 3), label="queries")
        q, q_kind = self._q(data, t)
        opts, bad_name = self._draw_options(data, q.shape[1])
        counts, ok = self._draw_counts(data, t)
        each = [t] * self.cfg.batch if counts is None else counts
        kwargs = dict(opts, **({} if counts is None else {"lengths": counts}))
        must_fail = bad_name is not None or not ok or q_kind == "fail"
        must_fail = must_fail or self.model.refuses_terms(opts)
        must_fail = must_fail or not self.model.attend_allowed(each)
        if must_fail:
            name = bad_name if ok and q_kind == "ok" else None
            self._expect_fail(lambda: self.cache.attend(q, **kwargs), name)
            return
        try:
            got = self.cache.attend(q, **kwargs)
        except (ValueError, TypeError) as err:
            assert q_kind == "either" and _names(str(err), "q"), f"refused: {err}"
            return
        self._check(got, self.model.attention(q, each, opts), q)

    @rule(data=st.data())
    def step(self, data) -> None:
        t = data.draw(st.integers(1, 3), label="tokens")
        q, q_kind = self._q(data, t)
        dtype = data.draw(st.sampled_from([F32, np.float16]), label="kv dtype")
        k = self._tokens(t, self.cfg.head_dim, dtype)
        v = self._tokens(t, self.cfg.value_dim, dtype)
        opts, bad_name = self._draw_options(data, q.shape[1])
        counts, ok = self._draw_counts(data, t)
        each = [t] * self.cfg.batch if counts is None else counts
        kwargs = dict(opts, **({} if counts is None else {"lengths": counts}))
        must_fail = bad_name is not None or not ok or q_kind == "fail"
        must_fail = must_fail or self.model.refuses_terms(opts) or not self.model.step_allowed(each)
        if must_fail:
            name = bad_name if ok and q_kind == "ok" and self.model.room(each) else None
            self._expect_fail(lambda: self.cache.step(q, k, v, **kwargs), name)
            return
        try:
            got = self.cache.step(q, k, v, **kwargs)
        except (ValueError, TypeError) as err:
            assert q_kind == "either" and _names(str(err), "q"), f"refused: {err}"
            return
        self.model.append(k, v, each)
        self._check(got, self.model.attention(q, each, opts), q)

    @rule(data=st.data())
    def rollback(self, data) -> None:
        n = data.draw(st.sampled_from([0, 1, 1, 2, 3, 5, -1, 1.0]), label="n")
        seq = data.draw(
            st.sampled_from([None, 0, self.cfg.batch - 1, self.cfg.batch, -1]), label="seq"
        )
        valid_n = isinstance(n, int) and n >= 0
        valid_seq = seq is None or 0 <= seq < self.cfg.batch
        seqs = list(range(self.cfg.batch)) if seq is None else [seq]
        if not (valid_n and valid_seq and self.model.can_roll_back(n, seqs)):
            kwargs = {} if seq is None else {"seq": seq}
            self._expect_fail(lambda: self.cache.rollback(n, **kwargs), None)
            return
        self.cache.rollback(n, seq=seq)
        self.model.rollback(n, seqs)

    @rule(seq=st.sampled_from([None, 0, 1, 2, -1, 0.5]))
    def reset(self, seq) -> None:
        if seq is not None and not (isinstance(seq, int) and 0 <= seq < self.cfg.batch):
            self._expect_fail(lambda: self.cache.reset(seq), "seq")
            return
        self.cache.reset(seq)
        self.model.reset(list(range(self.cfg.batch)) if seq is None else [seq])

    @precondition(lambda self: hasattr(self, "cache"))
    @rule(seq=st.sampled_from([-1, 2, 1.5, "0", None]))
    def read_bad_seq(self, seq) -> None:
        if isinstance(seq, int) and 0 <= seq < self.cfg.batch:
            return
        self._expect_fail(lambda: self.cache.keys(seq), "seq")
        self._expect_fail(lambda: self.cache.values(seq), "seq")

    @invariant()
    def storage_matches_the_model(self) -> None:
        if not hasattr(self, "cache"):
            return
        assert self.cache.lengths.tolist() == self.model.lengths, (
            f"lengths {self.cache.lengths.tolist()}, model {self.model.lengths}"
        )
        for b in range(self.cfg.batch):
            pos = self.model.stored(b)
            for name, read, hist in (
                ("keys", self.cache.keys, self.model.k),
                ("values", self.cache.values, self.model.v),
            ):
                got = np.asarray(read(b), dtype=np.float64)
                want = hist[b][:, pos]
                assert got.shape == want.shape, (
                    f"{name}({b}) has shape {got.shape}; the model holds positions {pos}"
                )
                assert np.array_equal(got, want), f"{name}({b}) differ from the model"


# Shrinking a failing run of this machine can take minutes: the failing steps are printed as
# found (at most 15), unless FERROATTN_SHRINK=1 asks for the shortest sequence.
_PHASES = (
    tuple(Phase)
    if os.environ.get("FERROATTN_SHRINK") == "1"
    else (Phase.explicit, Phase.reuse, Phase.generate)
)
KVCacheMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=15,
    deadline=None,
    phases=_PHASES,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestKVCacheModel = KVCacheMachine.TestCase
