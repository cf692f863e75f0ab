"""Models with MTP modules: the built-in tiny transformer (:mod:`decomp.models.tiny`) and
DeepSeek-V3-style MTP modules attached to Hugging Face causal LMs (:mod:`decomp.models.hf`).

Both return ``(main_logits, [mtp_logits_k])`` from ``forward(tokens, detach, with_mtp,
attention_mask)``, which is all the measurement core needs of a model.
"""
