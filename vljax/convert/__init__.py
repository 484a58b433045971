"""Import and export of public checkpoints: Hugging Face model directories (safetensors weights,
never pickle) in `vljax.convert.hf`, and their tokenizers in `vljax.convert.hf_tokenizer`.

The submodules are imported by name; they need the `hf` extra (safetensors, tokenizers).
"""
