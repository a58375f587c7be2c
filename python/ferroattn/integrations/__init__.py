"""Optional integrations with other libraries (imported on demand, never by ``ferroattn``).

* :mod:`ferroattn.integrations.transformers`: ``register()`` makes ``"ferroattn"`` a Hugging Face
  ``attn_implementation``.
"""
