"""Megatron-LM's own ``pretrain()`` with the NSA layer spec and the ``--nsa-*`` arguments (for GPU clusters).

    torchrun --nproc-per-node 8 -m nsa_parallel.pretrain_gpt <Megatron-LM's pretrain_gpt.py arguments> --nsa-...

Stock ``pretrain_gpt.py`` rejects flags it does not know; this entry point is the same pipeline (Megatron's GPT
datasets, its optimizer, checkpointing, logging) with the NSA arguments added and the NSA spec built from them.
``megatron.training`` ships in the megatron-core wheels from 0.17 on. Both ``pretrain()`` signatures are handled:
0.19's (a ``PretrainConfigContainer`` first) and the older one (dataset provider first, ``extra_args_provider``).
``forward_step`` splits each micro-batch for context parallelism (Megatron's load-balanced layout) and, with
``--reset-attention-mask``, hands NSA the sample's documents as a packed batch, as the lean trainer does; neither
has run through ``pretrain()`` yet (the CPU machines have no ``megatron.training`` runtime, CP needs 2 GPUs).
"""
from __future__ import annotations

import inspect
from functools import partial

import torch

from .arguments import add_nsa_args, nsa_config_from_args


def _args():
    from megatron.training import get_args
    return get_args()


def _transformer_config(args):
    try:
        from megatron.training.argument_utils import core_transformer_config_from_args
    except ImportError:  # megatron-core < 0.19
        from megatron.training.arguments import core_transformer_config_from_args
    return core_transformer_config_from_args(args)


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage=None, config=None,
                   pg_collection=None, **unused):
    """GPTModel with NSA attention, as Megatron's ``get_model`` asks for it (any megatron-core >= 0.17)."""
    from megatron.core.models.gpt import GPTModel

    from .megatron import get_gpt_layer_nsa_spec
    args = _args()
    _check_args(args)
    config = config or _transformer_config(args)
    spec = get_gpt_layer_nsa_spec(config, nsa_config=nsa_config_from_args(args), backend=args.nsa_backend,
                                  transformer_impl=getattr(args, "transformer_impl", None))
    kw = dict(config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
              max_sequence_length=args.max_position_embeddings, pre_process=pre_process, post_process=post_process,
              parallel_output=True, share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
              position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
              rotary_base=args.rotary_base)
    accepted = inspect.signature(GPTModel.__init__).parameters
    for name, value in (("vp_stage", vp_stage), ("pg_collection", pg_collection)):
        if value is not None and name in accepted:
            kw[name] = value
    return GPTModel(**kw)


def _tokenizer(args):
    from megatron.training import get_tokenizer
    tok = get_tokenizer()
    if tok is None:  # 0.19 builds the (non-legacy) tokenizer on demand
        from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer
        tok = build_tokenizer(args)
    return tok


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's GPT datasets (``--data-path`` / ``--mock-data``), built on every first/last-stage rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    try:
        from megatron.training.utils import get_blend_and_blend_per_split
    except ImportError:
        from megatron.training.utils.common_utils import get_blend_and_blend_per_split
    args = _args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, path_to_cache=args.data_cache_path, mmap_bin_files=args.mmap_bin_files,
        tokenizer=_tokenizer(args), reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False)
    on_rank = ps.is_pipeline_first_stage(ignore_virtual=True) or ps.is_pipeline_last_stage(ignore_virtual=True)
    cls = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, train_val_test_num_samples, lambda: on_rank, config).build()


# every first/last-stage rank builds the (deterministic) datasets, so no tensor-parallel broadcast is needed
datasets_provider.is_distributed = True


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses, mask = output_tensor.view(-1).float(), loss_mask.view(-1).float()
    loss = (losses * mask).sum()
    num_tokens = mask.sum().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1), num_tokens.view(1).float()])}


def forward_step(data_iterator, model):
    """One micro-batch: this CP rank's part of the sequences (Megatron's load-balanced split), with
    ``--reset-attention-mask`` the sample's documents as a packed batch (the lean trainer's packing,
    :func:`nsa_parallel.train.micro_batch_on_this_rank`)."""
    from megatron.core import parallel_state as ps

    from .train import micro_batch_on_this_rank
    if not (ps.is_pipeline_first_stage(ignore_virtual=True) or ps.is_pipeline_last_stage(ignore_virtual=True)):
        return _run_model(_args(), model, None, None, None), partial(_loss_func, None)
    args = _args()
    batch = {k: v.to(_device(), non_blocking=True) for k, v in next(data_iterator).items()
             if k in ("tokens", "labels", "loss_mask", "position_ids")}
    batch, packed = micro_batch_on_this_rank(batch, *_document_setup(args))
    out = _run_model(args, model, batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                     packed_seq_params=packed)
    return out, partial(_loss_func, batch["loss_mask"])


# NSA's per-layer statistics to TensorBoard: the iteration last logged, this process's writer
_STATS = {"iteration": None, "writer": None}


def _run_model(args, model, *inputs, **kw):
    """``model(*inputs, **kw)``, with NSA's statistics collected and written on a logged iteration."""
    cores = _stats_cores(args, model)
    out = model(*inputs, **kw)
    _write_stats(args, cores)
    return out


def _stats_cores(args, model) -> list:
    """The model's NSA core-attention modules, asked for their statistics on the first micro-batch of an iteration
    Megatron logs (``--log-interval``, with ``--tensorboard-dir``); on other micro-batches not (the statistics
    read the GPU's numbers back: a sync)."""
    from .megatron.attention import NSACoreAttention
    iteration = getattr(args, "curr_iteration", 0) + 1  # Megatron logs after counting the iteration
    if not getattr(args, "tensorboard_dir", None) or iteration % args.log_interval or _STATS["iteration"] == iteration:
        return []
    _STATS["iteration"] = iteration
    cores = [m for m in model.modules() if isinstance(m, NSACoreAttention)]
    for core in cores:
        core.collect_stats = True
    return cores


def _write_stats(args, cores) -> None:
    """``nsa/layer{N}/...`` (as the lean trainer names them) of this pipeline stage's layers, written by the stage's
    first tensor-, data- and context-parallel rank into ``--tensorboard-dir`` (its own event file: Megatron's
    writer lives on the last rank only; TensorBoard reads every event file of the directory as one run)."""
    from megatron.core import parallel_state as ps
    if not cores:
        return
    for core in cores:
        core.collect_stats = False
    if ps.get_tensor_model_parallel_rank() or ps.get_data_parallel_rank() or ps.get_context_parallel_rank():
        return
    if _STATS["writer"] is None:
        from torch.utils.tensorboard import SummaryWriter
        _STATS["writer"] = SummaryWriter(args.tensorboard_dir, filename_suffix=".nsa_stage"
                                         f"{ps.get_pipeline_model_parallel_rank()}")
    for core in cores:
        for key, value in core.stats.items():
            _STATS["writer"].add_scalar(f"nsa/layer{core.layer_number - 1}/{key}", value, _STATS["iteration"])
    _STATS["writer"].flush()


_DOCUMENT_SETUP: dict = {}


def _document_setup(args):
    """(EOD token, NSAConfig) for ``--reset-attention-mask``, else (None, None); built once per run, not per
    micro-batch (0.19's ``get_tokenizer()`` is None and the tokenizer would be rebuilt on every call)."""
    if not args.reset_attention_mask:
        return None, None
    if id(args) not in _DOCUMENT_SETUP:
        _DOCUMENT_SETUP[id(args)] = (_tokenizer(args).eod, nsa_config_from_args(args))
    return _DOCUMENT_SETUP[id(args)]


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _check_args(args) -> None:
    """What this entry point cannot do, by name (Megatron's own checks run before)."""
    if args.reset_attention_mask and args.pipeline_model_parallel_size > 2:
        # the documents' bounds come from the tokens, which Megatron hands only the first and last stages
        raise SystemExit(f"nsa_parallel.pretrain_gpt: --reset-attention-mask with --pipeline-model-parallel-size="
                         f"{args.pipeline_model_parallel_size}; allowed: 1 or 2 (python -m nsa_parallel.train "
                         f"takes any)")
    if args.reset_attention_mask and args.micro_batch_size != 1:
        raise SystemExit(f"nsa_parallel.pretrain_gpt: --reset-attention-mask packs one sample's documents into one "
                         f"sequence: --micro-batch-size={args.micro_batch_size}; allowed: 1")
    cp = getattr(args, "context_parallel_size", 1)
    if args.reset_attention_mask and cp > 1 and not getattr(args, "calculate_per_token_loss", False):
        # Megatron's schedule divides each rank's loss by that rank's token count unless told otherwise
        raise SystemExit(f"nsa_parallel.pretrain_gpt: --reset-attention-mask with --context-parallel-size={cp} holds "
                         f"short documents whole on one CP rank, so the ranks' loss-token counts differ and the "
                         f"per-rank loss means would weigh tokens unevenly; add --calculate-per-token-loss (the "
                         f"loss summed over tokens and divided by their global count)")


def _use_prebuilt_dataset_helpers() -> None:
    """megatron.training compiles the dataset index helpers with ``make`` in the installed package at start-up;
    the wheels ship them prebuilt and without the Makefile, so that step can only fail. Skip it when the prebuilt
    extension imports."""
    from megatron.core.datasets import utils
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return  # a source checkout: let Megatron compile them
    utils.compile_helpers = lambda: None


def main() -> None:
    try:
        from megatron.training import pretrain
    except ImportError as e:
        import megatron.core
        raise SystemExit(f"nsa_parallel.pretrain_gpt needs megatron.training, shipped with megatron-core >= 0.17; "
                         f"installed: {megatron.core.__version__} ({e}). Use python -m nsa_parallel.train instead.")
    from megatron.core.enums import ModelType
    _use_prebuilt_dataset_helpers()
    params = list(inspect.signature(pretrain).parameters)
    if params[0] == "cfg_container":  # megatron-core >= 0.19
        from megatron.training.argument_utils import pretrain_cfg_container_from_args
        from megatron.training.arguments import parse_and_validate_args
        args = parse_and_validate_args(extra_args_provider=add_nsa_args)
        pretrain(pretrain_cfg_container_from_args(args), datasets_provider, ModelType.encoder_or_decoder,
                 forward_step, model_provider=model_provider)
    else:
        pretrain(datasets_provider, model_provider, ModelType.encoder_or_decoder, forward_step,
                 extra_args_provider=add_nsa_args)


if __name__ == "__main__":
    main()
