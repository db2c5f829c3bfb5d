"""Teacher presets: plain functions returning a `PretrainConfig`.

Each preset starts from another (or the defaults) and changes fields. `PRESETS` maps the names that
`--preset` accepts to these functions.
"""

from __future__ import annotations

from dataclasses import replace

from pipeline.config import DataConfig, ModelConfig, OptimConfig, PretrainConfig, TrainConfig


def seed() -> PretrainConfig:
    """Exactly the exercise sheet's model: o200k_base, 1 layer, 4 heads, d_model 256, 256 tokens.

    Attention only (token + learned position embeddings, causal multi-head attention with W_o, an
    untied LM head; no LayerNorm, FFN or residual), batch 32: 2 x 200,019 x 256 + attention +
    positions = 102.7M parameters. The vocabulary stays full so the sheet's memory questions hold;
    `--data.compact-vocab on` trains the same model on the 12,734 classes Shakespeare uses.
    """
    return PretrainConfig(
        data=DataConfig(encoding="o200k_base", seq_len=256, compact_vocab="off"),
        model=ModelConfig(
            block="attention_only", n_layers=1, n_heads=4, d_model=256, max_seq_len=256, positions="learned"
        ),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=20, weight_decay=0.1),
        train=TrainConfig(micro_batch_size=32, max_epochs=5, eval_interval=20),
    )


def shakespeare() -> PretrainConfig:
    """The default teacher: pre-LN transformer, 4 layers, 4 heads, d_model 256, RoPE, tied head.

    o200k_base on Tiny Shakespeare uses 12,151 ids, so the vocabulary is compacted to 12,152 classes
    (6.3M parameters, 3.2M of them the shared embedding/head). Chosen by measurement on the 2-core
    CPU (bf16, batch 32 x 256): the same shape with an untied head and dropout 0.2 overfits sooner
    (best val loss 5.711 at 8.6 epochs, train 4.13, early-stopped at 12.3 epochs after 759 s);
    tying the head (fewer parameters for rare ids) reaches 5.681 after 12 epochs in 706 s (4,526
    tokens/s), still improving as the learning rate decays. 12 epochs is the ~12-minute budget.
    """
    return PretrainConfig(
        data=DataConfig(encoding="o200k_base", seq_len=256),
        model=ModelConfig(
            block="transformer",
            n_layers=4,
            n_heads=4,
            d_model=256,
            max_seq_len=256,
            positions="rope",
            dropout=0.2,
            tie_head=True,
        ),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=50, weight_decay=0.1),
        train=TrainConfig(micro_batch_size=32, max_epochs=12, eval_interval=40, early_stop_patience=3),
    )


def char() -> PretrainConfig:
    """nanoGPT's CPU recipe for shakespeare_char, for comparison (nanoGPT: val 1.8857 in 83 s here).

    `python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
    --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
    --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`: 4 layers, 4 heads, d_model 128, block 64,
    batch 12, 2000 iterations, warmup 100 then cosine to step 2000, AdamW (0.9, 0.99) with weight
    decay 0.1 on every matrix (embeddings too), clipping at 1, no biases, tied head, learned positions.

    One change, by measurement: the peak learning rate. With nanoGPT's 1e-3 (min 1e-4) this model
    reaches val loss 1.910 at step 2000 here (nanoGPT's 1.8857 is a 20-batch estimate); the model is
    far from converged at 2000 steps, and 2e-3 gives 1.826, 3e-3 1.784, 4e-3 1.780 (min_lr = lr/10).
    3e-3 is the knee. Evaluations every 500 steps instead of 250 cost less wall time.
    """
    return PretrainConfig(
        data=DataConfig(encoding="char", seq_len=64, compact_vocab="off"),
        model=ModelConfig(
            block="transformer",
            n_layers=4,
            n_heads=4,
            d_model=128,
            max_seq_len=64,
            dropout=0.0,
            positions="learned",
            tie_head=True,
            bias=False,
        ),
        optim=OptimConfig(
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=100,
            # Decay over the run: nanoGPT's lr_decay_iters 2000 at its 2,000 steps, and any other
            # --max-steps (each run of a scaling study too) over its own length.
            decay_steps=0,
            beta2=0.99,
            weight_decay=0.1,
            decay_embeddings=True,
        ),
        train=TrainConfig(
            micro_batch_size=12, max_steps=2000, eval_interval=500, eval_tokens=15360, log_interval=50
        ),
    )


def quick() -> PretrainConfig:
    """The quickstart's teacher (`bash launch/quickstart.sh`): the `char` model, trained for 1,200 steps.

    Character-level, so that a few minutes on a laptop CPU give text that reads like Shakespeare and
    compounding errors that run over several tokens. The same model, data and optimizer as `char`
    (nanoGPT's CPU recipe), with the schedule ending at 1,200 steps (0.9M tokens, 0.9 epochs) and the
    probes that cost most per evaluation (head ablation, maps) at a smaller size.
    """
    base = char()
    return replace(
        base,
        train=replace(
            base.train,
            max_steps=1200,  # the schedule (decay_steps 0) ends here too
            eval_interval=300,
            eval_tokens=8192,
            probe=replace(base.train.probe, importance_tokens=1024, map_tokens=24),
        ),
    )


def gpt2_small() -> PretrainConfig:
    """GPT-2 small's shape (124M parameters), for measuring GPU throughput against a known model.

    12 layers, 12 heads, d_model 768, 1,024 tokens, learned positions, a tied head, GELU, pre-LN,
    biases, dropout 0, and GPT-2's own 50,257-token vocabulary (not compacted): 124,439,808
    parameters, as Hugging Face's `gpt2`. It exists as the GPT-2-small sized teacher of the GPU MFU
    target (issue 15): `python recipes/benchmark.py --preset gpt2_small` on a GPU. It is too big to
    train on the 2-core CPU: a step of 8 x 1,024 tokens is ~7 TFLOP, 20 s or more at that CPU's
    ~0.4 TFLOP/s bf16 matmul peak.

    Micro-batch 8 x 1,024 tokens: the memory account (`python recipes/memory.py --preset gpt2_small
    --train.precision bf16`) is 7.3 GiB with the attention probabilities materialised, less with
    SDPA, so it fits a 16 GB GPU; on an 80 GB one raise --train.micro-batch-size (32) for a higher
    MFU. The optimizer is nanoGPT's GPT-2 recipe (6e-4 decaying to 6e-5, AdamW beta2 0.95, weight
    decay 0.1, clipping at 1) with a warmup sized to Tiny Shakespeare, whose 304k gpt2 training
    tokens are 37 steps an epoch here: this model memorises them within a few epochs, so it is a
    throughput target, not a better teacher than `shakespeare`.
    """
    return PretrainConfig(
        data=DataConfig(encoding="gpt2", seq_len=1024, compact_vocab="off"),
        model=ModelConfig(
            block="transformer",
            n_layers=12,
            n_heads=12,
            d_model=768,
            max_seq_len=1024,
            positions="learned",
            dropout=0.0,
            tie_head=True,
            bias=True,
            activation="gelu",
        ),
        optim=OptimConfig(lr=6e-4, min_lr=6e-5, warmup_steps=20, beta2=0.95, weight_decay=0.1, grad_clip=1.0),
        train=TrainConfig(
            micro_batch_size=8,
            max_epochs=3,
            eval_interval=25,
            eval_tokens=16384,
            early_stop_patience=2,
            log_interval=5,
        ),
    )


def tiny() -> PretrainConfig:
    """A few-thousand-parameter model for tests: seconds on one CPU core."""
    base = char()
    return replace(
        base,
        data=replace(base.data, seq_len=32),
        model=ModelConfig(
            block="transformer", n_layers=2, n_heads=2, d_model=32, max_seq_len=32, positions="learned"
        ),
        optim=replace(base.optim, lr=1e-3, min_lr=1e-4, warmup_steps=2, decay_steps=0),
        train=TrainConfig(
            micro_batch_size=4,
            max_steps=20,
            eval_interval=10,
            eval_tokens=1024,
            log_interval=5,
            sample_tokens=16,
            projector_tokens=50,
        ),
    )


PRESETS = {
    "shakespeare": shakespeare,
    "seed": seed,
    "char": char,
    "quick": quick,
    "gpt2_small": gpt2_small,
    "tiny": tiny,
}
