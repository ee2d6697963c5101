"""ONNX, for onnxruntime and the runtimes built on it: llmctl's own forward exported with torch.onnx's
dynamo exporter as one graph whose KV cache is an input and an output, under the names optimum and
onnxruntime-genai use (`past_key_values.N.key|value` in, `present.N.key|value` out), so a caller decodes
with it exactly as with an optimum export. The directory holds `model.onnx`, the checkpoint's config.json
and its tokenizer.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmctl.atomic import atomic_directory
from llmctl.data.tokenizer_base import Tokenizer
from llmctl.errors import UserError
from llmctl.model import ModelConfig, Transformer
from llmctl.model.hf_format import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    from_hf_config,
    generation_config,
    to_hf_config,
)

ONNX_FILE = "model.onnx"
# protobuf caps one file at 2 GiB: larger models keep their weights in model.onnx.data beside the graph
EXTERNAL_DATA_BYTES = 1536 << 20


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("ONNX export needs onnx and onnxscript: pip install 'llmctl[onnx]'") from None


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("running an ONNX export needs onnxruntime: pip install 'llmctl[onnx]'") from None
    return onnxruntime


def input_names(config: ModelConfig) -> list[str]:
    cache = [
        f"past_key_values.{layer}.{part}" for layer in range(config.n_layer) for part in ("key", "value")
    ]
    return ["input_ids", "attention_mask", "position_ids", *cache]


def output_names(config: ModelConfig) -> list[str]:
    return [
        "logits",
        *(f"present.{layer}.{part}" for layer in range(config.n_layer) for part in ("key", "value")),
    ]


class _ConcatCache:
    """The cache protocol the model's attention calls (`update`, `advance`, `length`), over the past keys and
    values given as graph inputs: each layer appends its new positions and the result is a graph output."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.past = past
        self.length = past[0][0].shape[2]
        self.present: list[torch.Tensor] = []

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        past_keys, past_values = self.past[layer]
        keys, values = torch.cat((past_keys, keys), dim=2), torch.cat((past_values, values), dim=2)
        self.present += [keys, values]
        return keys, values

    def advance(self, n_tokens: int) -> None:
        """The caller feeds the present back as the next past: nothing to move here."""


class _CachedStep(nn.Module):
    """(input_ids, attention_mask, position_ids, *past) -> (logits, *present): the signature exported."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cache = _ConcatCache(list(zip(past[0::2], past[1::2], strict=True)))
        logits = self.model(
            input_ids, position_ids=position_ids, attention_mask=attention_mask, kv_cache=cache
        )
        return (logits, *cache.present)


def empty_past(config: ModelConfig, batch: int) -> list[np.ndarray]:
    """Zero cached positions for every layer: the past of a first (prefill) call."""
    shape = (batch, config.kv_heads, 0, config.head_dim)
    return [np.zeros(shape, dtype=np.float32) for _ in range(2 * config.n_layer)]


def _example_inputs(config: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Two rows of three new tokens after two cached ones: every dimension the graph leaves dynamic is
    above one in the example, so the exporter does not specialise it."""
    batch, seq, cached = 2, 3, 2
    ids = torch.full((batch, seq), config.bos_token_id, dtype=torch.long)
    mask = torch.ones(batch, cached + seq, dtype=torch.long)
    positions = torch.arange(cached, cached + seq).expand(batch, seq)
    past = torch.zeros(batch, config.kv_heads, cached, config.head_dim)
    return (ids, mask, positions, *(past.clone() for _ in range(2 * config.n_layer)))


def write_onnx(directory: Path, model: Transformer, tokenizer: Tokenizer) -> None:
    """Export a float model (batch, sequence and cache length dynamic) with its config and tokenizer,
    atomically: a failed export leaves nothing at `directory`."""
    require_onnx()
    config = model.config
    dynamic = torch.export.Dim.DYNAMIC
    cache_shape = {0: dynamic, 2: dynamic}
    shapes = (
        {0: dynamic, 1: dynamic},  # input_ids
        {0: dynamic, 1: dynamic},  # attention_mask: cached + new positions
        {0: dynamic, 1: dynamic},  # position_ids
        tuple(cache_shape for _ in range(2 * config.n_layer)),
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with atomic_directory(directory) as staging, _quiet_exporter():
        torch.onnx.export(
            _CachedStep(model.float().eval()),
            _example_inputs(config),
            str(staging / ONNX_FILE),
            dynamo=True,
            dynamic_shapes=shapes,
            input_names=input_names(config),
            output_names=output_names(config),
            external_data=weight_bytes > EXTERNAL_DATA_BYTES,
            verbose=False,
        )
        hf_config = to_hf_config(config, torch.float32) | {"use_cache": True}
        (staging / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        (staging / GENERATION_CONFIG_FILE).write_text(json.dumps(generation_config(config), indent=2) + "\n")
        tokenizer.copy_into(staging, config.max_seq_len)


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx logs each stage and warns about optional packages (torchvision): a user sees none of it."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


class OnnxCausalLM:
    """An exported model in onnxruntime. `step` is one call with the cache; calling it with (batch, seq) ids
    gives logits from an empty cache, the way `perplexity` calls a Transformer, so llmctl's own evaluation
    measures the export."""

    device = torch.device("cpu")

    def __init__(self, directory: Path, threads: int | None = None) -> None:
        onnxruntime = require_onnxruntime()
        directory = Path(directory)
        if not (directory / ONNX_FILE).is_file():
            raise UserError(f"{directory} holds no {ONNX_FILE}; write one with llmctl export --format onnx")
        self.config = from_hf_config(json.loads((directory / CONFIG_FILE).read_text()))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = onnxruntime.InferenceSession(
            str(directory / ONNX_FILE), options, providers=["CPUExecutionProvider"]
        )
        self.names = input_names(self.config)

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list[np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits (batch, seq, vocab) of the new tokens, and the cache with them appended."""
        feeds = dict(zip(self.names, (input_ids, attention_mask, position_ids, *past), strict=True))
        logits, *present = self.session.run(None, feeds)
        return logits, present

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, seq = input_ids.shape
        ids = input_ids.cpu().numpy().astype(np.int64)
        positions = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq))
        logits, _ = self.step(ids, np.ones((batch, seq), np.int64), positions, empty_past(self.config, batch))
        return torch.from_numpy(logits)

    def greedy(self, prompt: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
        """Batch-1 greedy decoding through the cache inputs: the prompt once, then one token per call, up to
        a stop id (kept), `max_new_tokens` or the context end."""
        ids = np.asarray([prompt], dtype=np.int64)
        length, past, produced = 0, empty_past(self.config, 1), []
        while len(produced) < max_new_tokens and length + ids.shape[1] <= self.config.max_seq_len:
            positions = np.arange(length, length + ids.shape[1], dtype=np.int64)[None]
            logits, past = self.step(ids, np.ones((1, positions[0, -1] + 1), np.int64), positions, past)
            length += ids.shape[1]
            produced.append(int(logits[0, -1].argmax()))
            if produced[-1] in stop_ids:
                break
            ids = np.asarray([produced[-1:]], dtype=np.int64)
        return produced
