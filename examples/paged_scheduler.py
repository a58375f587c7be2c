"""A minimal continuous-batching scheduler over :class:`ferroattn.PagedKVCache`.

Requests arrive over time with prompts of different lengths. Each step, every running request
contributes tokens to one packed attention call: a chunk of its prompt while it is prefilling,
one token once it decodes. A request that asks for two samples is forked after its prefill (the
two samples share the prompt's blocks). Finished requests free their blocks; when the pool runs
dry the newest request is preempted (freed, and recomputed later), as vLLM's scheduler does.

Queries, keys and values are random: in a model they are the projections of each token's
hidden state. One attention layer is shown; a model has one cache per layer.

    python examples/paged_scheduler.py
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import ferroattn

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64
BLOCK_SIZE, NUM_BLOCKS = 16, 48
CHUNK = 64  # prompt tokens a request prefills per step
TOKEN_BUDGET = 160  # tokens one step processes at most


@dataclass
class Request:
    name: str
    arrival: int  # step at which it arrives
    prompt: int  # prompt tokens
    new_tokens: int  # tokens to generate
    samples: int = 1  # 2: forked into two samples after the prefill
    done: int = 0  # tokens processed so far (prompt, then generated)


def make_requests(rng: np.random.Generator, n: int) -> list[Request]:
    requests = []
    for i in range(n):
        requests.append(
            Request(
                name=f"r{i}",
                arrival=int(rng.integers(0, 12)),
                prompt=int(rng.integers(20, 300)),
                new_tokens=int(rng.integers(4, 24)),
                samples=2 if i % 4 == 3 else 1,
            )
        )
    return sorted(requests, key=lambda r: r.arrival)


def run(seed: int = 0, n_requests: int = 10) -> None:
    rng = np.random.default_rng(seed)
    cache = ferroattn.PagedKVCache(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype="float16")
    waiting = make_requests(rng, n_requests)
    running: dict[str, Request] = {}  # sequence id -> its request (a fork: a copy of it)
    step = finished = preempted = 0
    while waiting or running:
        # Admit what has arrived while its prompt fits, leaving a block per running request.
        while waiting and waiting[0].arrival <= step:
            req = waiting[0]
            if cache.num_free_blocks < -(-req.prompt // BLOCK_SIZE) + len(running):
                break
            waiting.pop(0)
            cache.add(req.name)
            running[req.name] = req
            print(
                f"step {step:3d}: admitted {req.name} (prompt {req.prompt}, {req.samples} x "
                f"{req.new_tokens} new tokens)"
            )
        if not running:
            step += 1
            continue
        # What each sequence brings this step: a prompt chunk, one decode token, or nothing.
        ids, q_lens, budget = [], [], TOKEN_BUDGET
        for sid, req in running.items():
            want = min(CHUNK, req.prompt - req.done) if req.done < req.prompt else 1
            take = min(want, budget)
            budget -= take
            ids.append(sid)
            q_lens.append(take)
        total = sum(q_lens)
        q = rng.standard_normal((total, HEADS, HEAD_DIM), dtype=np.float32)
        k = rng.standard_normal((total, KV_HEADS, HEAD_DIM), dtype=np.float32)
        v = rng.standard_normal((total, KV_HEADS, HEAD_DIM), dtype=np.float32)
        try:
            out = cache.step_varlen(ids, q, k, v, q_lens)
        except ValueError as e:  # out of blocks: nothing was stored; make room and retry
            newest = ids[-1]
            req = running.pop(newest)
            cache.free(newest)
            req.done, req.arrival = 0, step + 1  # recomputed from its prompt, later
            waiting.insert(0, req)
            preempted += 1
            print(f"step {step:3d}: {e}: preempted {newest}")
            continue
        assert out.shape == (total, HEADS, HEAD_DIM) and np.isfinite(out).all()
        for sid, n in zip(ids, q_lens, strict=True):
            req = running[sid]
            req.done += n
            if req.done == req.prompt and req.samples == 2:
                twin = Request(**{**req.__dict__, "name": req.name + "/2", "samples": 1})
                cache.fork(sid, twin.name)
                running[twin.name] = twin
                req.samples = 1
                print(
                    f"step {step:3d}: forked {twin.name} from {sid} (shares "
                    f"{-(-req.prompt // BLOCK_SIZE)} blocks)"
                )
            elif req.done == req.prompt + req.new_tokens:
                cache.free(sid)
                del running[sid]
                finished += 1
                print(f"step {step:3d}: finished {sid} ({cache.num_free_blocks} blocks free)")
        step += 1
    assert cache.num_free_blocks == NUM_BLOCKS
    print(
        f"{finished} sequences finished in {step} steps, {preempted} preemptions; all blocks free"
    )


if __name__ == "__main__":
    run()
