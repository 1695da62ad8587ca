"""Model FLOPs per training example, counted analytically from the config (pure: no TensorFlow).

MFU (model FLOPs utilisation) = FLOPs per example x examples/s / the peak of the devices that trained them.
The count is of matrix multiplications only, as Megatron, PaLM and torchtitan count it:

  * forward: 2 x m x n x k for each [m, k] @ [k, n] product a training step computes (dense layers, the
    GRU's input and recurrent kernels at every time step, attention scores Q K^T and weights x V);
  * backward: 2 x forward (the gradient with respect to the input and the one with respect to the weights,
    each a product of the same size), so training = 3 x forward;
  * embedding look-ups (gathers), LayerNorm, softmax, masks, activations, dropout and the optimizer update
    are elementwise: not counted. They are a small share of the work at any width that is compute bound,
    which is what MFU is about. tests/unit/test_flops.py checks every formula against the matrix products
    in XLA's own HLO of the compiled forward and backward step.

Padding is counted: every position of a [B, max_len] batch is computed, so the model FLOPs are those of
the full shapes, the same for every batch.

Adding a model kind: one function `(cfg_model, *, vocab_size, **dims) -> forward FLOPs per example`
registered with `@formula("<kind>")`, taking the sizes its task's `model_dims` gives the builder
(trainer/tasks/). tests/unit/test_flops.py fails for a kind in trainer/tasks WORKLOADS without one.
"""
from __future__ import annotations

from typing import Any, Callable

FORMULAS: dict[str, Callable[..., int]] = {}  # model kind -> forward matmul FLOPs of one example
BACKWARD_FACTOR = 2  # the input gradient and the weight gradient: each as many FLOPs as the forward product


def formula(kind: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Register the forward FLOPs per example of model kind `kind`."""
    def register(fn: Callable[..., int]) -> Callable[..., int]:
        FORMULAS[kind] = fn
        return fn
    return register


def dense(rows: int, inputs: int, outputs: int) -> int:
    """Forward FLOPs of `rows` vectors through a [inputs, outputs] kernel (a multiply and an add each)."""
    return 2 * rows * inputs * outputs


@formula("classifier")
def classifier_forward(cfg: Any, *, vocab_size: int, max_len: int, num_classes: int = 2) -> int:
    """Embedding (a gather) -> masked mean (elementwise) -> Dense(hidden) -> Dense(1 or K)."""
    del vocab_size, max_len
    head = 1 if num_classes == 2 else num_classes
    return dense(1, cfg.embed_dim, cfg.hidden_dim) + dense(1, cfg.hidden_dim, head)


def gru(steps: int, inputs: int, units: int) -> int:
    """A GRU over `steps` positions: input kernel [inputs, 3 units] and recurrent kernel [units, 3 units]
    at every step (Keras's reset_after GRU)."""
    return steps * (dense(1, inputs, 3 * units) + dense(1, units, 3 * units))


@formula("summarizer")
def summarizer_forward(cfg: Any, *, vocab_size: int, max_len: int, summary_len: int) -> int:
    """Bidirectional GRU encoders, the bridge, a GRU decoder, Luong attention and the vocabulary head."""
    E, H, L, S = cfg.embed_dim, cfg.hidden_dim, max_len, summary_len
    flops = 0
    for layer in range(cfg.encoder_layers):
        flops += 2 * gru(L, E if layer == 0 else 2 * H, H)  # forward and backward directions
    flops += dense(1, 2 * H, H)  # bridge: [fwd; bwd] final states -> the decoder's initial state
    flops += gru(S, E, H)  # decoder
    flops += dense(L, 2 * H, H)  # key projection of the encoded document
    flops += 2 * S * L * H + 2 * S * L * 2 * H  # scores (query . key), context (weights x encoded, width 2H)
    flops += dense(S, 3 * H, H)  # combine [query; context]
    return flops + dense(S, H, vocab_size)  # output logits


def attention(queries: int, keys: int, d_model: int) -> int:
    """Multi-head attention core, all heads (head width x heads = d_model): Q K^T and weights x V."""
    return 2 * (2 * queries * keys * d_model)


@formula("transformer")
def transformer_forward(cfg: Any, *, vocab_size: int, max_len: int, summary_len: int) -> int:
    """Pre-LN encoder-decoder: per block the Q, K, V, O projections, the attention core and the FFN;
    the decoder's cross-attention projects the document (keys and values) in every block; causal masking
    does not shorten the products (the full score matrix is computed)."""
    D, F, L, S = cfg.d_model, cfg.ff_dim, max_len, summary_len
    ffn = lambda rows: dense(rows, D, F) + dense(rows, F, D)  # noqa: E731
    encoder = 4 * dense(L, D, D) + attention(L, L, D) + ffn(L)
    self_attn = 4 * dense(S, D, D) + attention(S, S, D)
    cross_attn = 2 * dense(S, D, D) + 2 * dense(L, D, D) + attention(S, L, D)
    decoder = self_attn + cross_attn + ffn(S)
    return cfg.encoder_layers * encoder + cfg.decoder_layers * decoder + dense(S, D, vocab_size)


@formula("lm")
def lm_forward(cfg: Any, *, vocab_size: int, seq_len: int) -> int:
    """Decoder-only: per block the Q, K, V, O projections, the attention core (the full causal score matrix
    is computed) and the FFN; then the vocabulary projection (tied or not, a product of the same size)."""
    L, D, F = seq_len, cfg.d_model, cfg.ff_dim
    block = 4 * dense(L, D, D) + attention(L, L, D) + dense(L, D, F) + dense(L, F, D)
    return cfg.layers * block + dense(L, D, vocab_size)


def forward_flops(cfg_model: Any, *, vocab_size: int, **dims: int) -> int:
    """Forward matmul FLOPs of one example for a `cfg.model` section; `dims` as the task's `model_dims`."""
    if cfg_model.kind not in FORMULAS:
        raise ValueError(f"no FLOPs formula for model kind {cfg_model.kind!r}; register one in trainer/flops.py")
    return FORMULAS[cfg_model.kind](cfg_model, vocab_size=vocab_size, **dims)


def training_flops(cfg_model: Any, *, vocab_size: int, **dims: int) -> int:
    """Forward + backward matmul FLOPs of one training example (3 x forward)."""
    return (1 + BACKWARD_FACTOR) * forward_flops(cfg_model, vocab_size=vocab_size, **dims)


def run_training_flops(cfg: Any, *, vocab_size: int, num_classes: int = 2) -> int:
    """`training_flops` of an experiment config's model, with its data's lengths (as the model is built)."""
    dims = cfg.task.model_dims(max_len=cfg.data.model_len, summary_len=cfg.data.summary_len, num_classes=num_classes)
    return training_flops(cfg.model, vocab_size=vocab_size, **dims)


def mfu(*, flops_per_example: float, examples_per_sec: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the model's FLOP/s over the peak FLOP/s of the devices that ran it."""
    return flops_per_example * examples_per_sec / peak_flops if peak_flops > 0 else 0.0
