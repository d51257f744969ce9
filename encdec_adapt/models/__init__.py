"""The model API: what the trainer, eval, infer and embed call on a model (`generative.py`:
decoder-only, encoder-decoder and distillation models; `embedding.py`: dual encoder and
classifier), with the losses, contrastive losses, decoding loops and T5Gemma warm starts they
use."""
