"""Sweeps over one kind of call, each with its own table: the prefill thread sweep
(``bench_prefill.py``) and the decode cells with their bandwidth figures (``bench_decode.py``)."""
