"""KV-cache generation engine: batched prefill (text + images), then jitted multi-step decode calls.

Layout. A batch of B requests is left-padded to one prompt length P: row i's n_i tokens sit in slots [P-n_i, P),
pad slots carry segment id 0 (never attended) and RoPE positions are `cumsum(mask) - 1`, so every row's last prompt
token is at slot P-1 and all rows advance through the cache together. The cache (`models.qwen3.init_cache`:
k/v [L,B,S,Hkv,hd], segment ids [B,S], a shared write index) has S >= P + decode slots. Image tiles of all rows are
concatenated in row order; the k-th `<IMG_CONTEXT>` token of the batch (row-major) takes the k-th feature, exactly
as `SailVL.embed` does. An AnyRes model (`ImageSlots.anyres`) takes each request's native-resolution patches
instead: a request's images are packed into one ViT row (`models.anyres.pack_patches`), request order again.

Static shapes. P and S are rounded up by `bucket` (four sizes per octave, at most 25 % padding for long prompts),
the batch to a power of two (extra rows are empty), tiles to a multiple of a power-of-two chunk <= `tile_chunk`,
AnyRes patch rows by `bucket` too,
and a decode call is a `lax.while_loop` over a static token buffer (`decode_steps` long when streaming, else the
cache's free slots, so the whole decode is one device call) that stops on the device once every row has met a stop
token; sampling settings other than the filter kind (temperature, top-p value, stop ids, the step budget) are data.
So a serving process compiles a handful of programs, shared by all engines on an equal model. The decode call
donates its state (cache included), which XLA then updates in place.

Shared prompts. Identical requests (the n samples of one RL prompt) are prefilled once; the prefill program copies
each distinct prompt's cache rows and last logits to its requests' rows before sampling, with each row's own key.

Sharding. With a mesh, parameters are placed by the logical rules and the cache is constrained to batch over the
data axes and kv heads over `tensor` (dimensions a mesh axis does not divide stay replicated).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sail_jax.config import PAD_TOKEN_ID
from sail_jax.inference.sampling import SamplerKind, SamplingParams, sample, step_keys
from sail_jax.inference.text import check_context_length
from sail_jax.layers.common import as_dtype
from sail_jax.models.anyres import llm_tokens, pack_patches, stack_packed
from sail_jax.models.generative import GenerativeModel
from sail_jax.models.qwen3 import init_cache
from sail_jax.sharding import logical_to_sharding, tree_shardings, use_mesh

TokenCallback = Callable[[int, list[int]], None]
_KV_AXES = (None, "activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")


@dataclass(frozen=True)
class Request:
    """One prompt: token ids [N] (with `<IMG_CONTEXT>` runs already expanded) and its tiles [T,3,H,W] or None; for
    an AnyRes model its images as `anyres_patches` [P, p*p*3] with their patch grids `anyres_grids` [n, 2] (the
    processor's AnyRes output) instead.

    Sampling noise: the row's key is `fold_in(key(SamplingParams.seed), seed)`, where `seed` defaults to the row's
    index in the `generate` call; give it to make a row's samples independent of the batch it runs in.
    """

    input_ids: np.ndarray
    pixel_values: np.ndarray | None = None
    seed: int | None = None
    anyres_patches: np.ndarray | None = None
    anyres_grids: np.ndarray | None = None

    @classmethod
    def from_encoding(cls, enc: dict[str, np.ndarray]) -> Request:
        """A request from `SailProcessor` output (input_ids [N] or [1, N]; tiles or AnyRes patches, if any)."""
        ids = np.asarray(enc["input_ids"]).reshape(-1)
        if len(enc.get("anyres_grids", ())):
            return cls(ids, anyres_patches=enc["anyres_patches"], anyres_grids=enc["anyres_grids"])
        pix = enc.get("pixel_values")
        return cls(ids, pix if pix is not None and len(pix) else None)


@dataclass
class Completion:
    """New token ids only (a final stop token included, as HF generate), why generation ended ("stop" or
    "length"), and when asked for: the float32 logits of each step [steps, V], and `logprobs` [steps], each token's
    log softmax(logits / temperature) over the whole vocabulary (temperature 1 when greedy; before top-k / top-p),
    computed on the device: what RL needs as the sampling policy's log-probs, without moving [steps, V] logits."""

    token_ids: list[int]
    finish_reason: str
    step_logits: np.ndarray | None = None
    logprobs: np.ndarray | None = None


def bucket(n: int, minimum: int = 16) -> int:
    """Round `n` up to a multiple of max(minimum, 2^(floor(log2 n) - 2)): four sizes per power of two, at most 25 %
    padding once n >= 8 * minimum (below that, less than `minimum` slots)."""
    n = max(int(n), minimum)
    granularity = max(minimum, 1 << max(n.bit_length() - 3, 0))
    return -(-n // granularity) * granularity


def shard_params(model: GenerativeModel, params: Any, mesh: jax.sharding.Mesh) -> Any:
    """Place `params` ({"params": ...}, unboxed) on `mesh` by the logical axis rules."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *model.dummy_inputs()))
    return jax.device_put(params, tree_shardings(boxed, mesh))


class _Programs:
    """The jitted device programs for one (model, cache dtype, mesh, pad id); shared by every engine on an equal
    model, so a new `Engine` (a new CLI call in one process, a test) reuses what was compiled."""

    def __init__(self, model: GenerativeModel, cache_dtype: Any, mesh: jax.sharding.Mesh | None, pad_token_id: int):
        self.model, self.cache_dtype, self.mesh, self.pad_token_id = model, cache_dtype, mesh, pad_token_id
        self.prefill = jax.jit(self.prefill, static_argnames=("cache_len", "kind", "with_logits", "with_logprobs"))
        self.decode = jax.jit(self.decode, static_argnames=("n_steps", "kind", "with_logits", "with_logprobs"),
                              donate_argnames=("state",))
        self.features = jax.jit(lambda p, x: model.apply(p, x, method="extract_feature"))
        self.packed_features = jax.jit(lambda p, x: model.apply(p, x, method="extract_feature_packed"))

    def _constrain_cache(self, cache: dict[str, jax.Array]) -> dict[str, jax.Array]:
        if self.mesh is None:
            return cache
        kv = logical_to_sharding(_KV_AXES, cache["k"].shape, self.mesh)
        seg = logical_to_sharding(("activation_batch", None), cache["segment_ids"].shape, self.mesh)
        wsc = jax.lax.with_sharding_constraint
        return {"k": wsc(cache["k"], kv), "v": wsc(cache["v"], kv), "segment_ids": wsc(cache["segment_ids"], seg),
                "index": cache["index"]}

    def _forward(self, params, embeds, positions, segment_ids, cache):
        """Run the LLM on `embeds` against `cache`; returns float32 logits of the last column and the new cache."""
        logits, cache = self.model.apply(params, embeds, positions, segment_ids, cache, method="last_logits")
        return logits, self._constrain_cache(cache)

    def prefill(self, params, ids, segment_ids, positions, features, feature_mask, rows, live, keys, temperature,
                top_p, stop_ids, *, cache_len: int, kind: SamplerKind, with_logits: bool, with_logprobs: bool):
        """Prefill the distinct prompts, then give each row its prompt's cache and logits (`rows` [B]: the prompt
        of each row, or None when every row has its own), and sample each row's first token with its own key."""
        embeds = self.model.apply(params, ids, features, feature_mask, method="embed_prompt")
        cache = self._constrain_cache(init_cache(self.model.llm_config, ids.shape[0], cache_len, self.cache_dtype))
        logits, cache = self._forward(params, embeds, positions, segment_ids, cache)
        if rows is not None:
            cache = self._constrain_cache({"k": cache["k"][:, rows], "v": cache["v"][:, rows],
                                           "segment_ids": cache["segment_ids"][rows], "index": cache["index"]})
            logits, positions = logits[rows], positions[rows]
        tok = sample(logits, step_keys(keys, jnp.int32(0)), kind, temperature, top_p)
        lp = _logprobs(logits, tok, kind, temperature) if with_logprobs else None
        state = {"cache": cache, "tok": tok, "pos": positions[:, -1] + 1,
                 "done": jnp.isin(tok, stop_ids) | ~live, "keys": keys, "step": jnp.ones((), jnp.int32)}
        return state, tok, lp, (logits if with_logits else None)

    def decode(self, params, state, limit, temperature, top_p, stop_ids,
               *, n_steps: int, kind: SamplerKind, with_logits: bool, with_logprobs: bool):
        """Up to `limit` (<= n_steps) decode steps in one device loop, which ends early once every row has met a stop
        token; returns tokens [B, n_steps] (pad after the last step run) and, when asked, their log-probs [B, n_steps]
        and the logits [B, n_steps, V]."""
        b = state["tok"].shape[0]
        ones = jnp.ones((b, 1), jnp.int32)
        toks = jnp.full((b, n_steps), self.pad_token_id, jnp.int32)
        logits_buf = jnp.zeros((b, n_steps, self.model.llm_config.vocab_size), jnp.float32) if with_logits else None
        lps = jnp.zeros((b, n_steps), jnp.float32) if with_logprobs else None

        def step(carry):
            st, toks, lps, logits_buf, i = carry
            embeds = self.model.apply(params, st["tok"][:, None], method="embed_prompt")
            logits, cache = self._forward(params, embeds, st["pos"][:, None], ones, st["cache"])
            tok = sample(logits, step_keys(st["keys"], st["step"]), kind, temperature, top_p)
            if with_logprobs:
                lps = jax.lax.dynamic_update_slice(lps, _logprobs(logits, tok, kind, temperature)[:, None], (0, i))
            tok = jnp.where(st["done"], self.pad_token_id, tok)
            new = {"cache": cache, "tok": tok, "pos": st["pos"] + 1,
                   "done": st["done"] | jnp.isin(tok, stop_ids), "keys": st["keys"],
                   "step": st["step"] + 1}
            toks = jax.lax.dynamic_update_slice(toks, tok[:, None], (0, i))
            if with_logits:
                logits_buf = jax.lax.dynamic_update_slice(logits_buf, logits[:, None], (0, i, 0))
            return new, toks, lps, logits_buf, i + 1

        def more(carry):
            st, *_, i = carry
            return (i < limit) & ~jnp.all(st["done"])

        state, toks, lps, logits_buf, _ = jax.lax.while_loop(more, step,
                                                             (state, toks, lps, logits_buf, jnp.int32(0)))
        return state, toks, lps, logits_buf


def _logprobs(logits: jax.Array, tok: jax.Array, kind: SamplerKind, temperature: jax.Array) -> jax.Array:
    """log softmax(logits / temperature)[tok] per row (temperature 1 when greedy), float32."""
    scaled = logits if kind.greedy else logits / temperature
    return jnp.take_along_axis(scaled, tok[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(scaled, axis=-1)


@functools.lru_cache(maxsize=16)
def _programs(model: GenerativeModel, cache_dtype: Any, mesh: jax.sharding.Mesh | None,
              pad_token_id: int) -> _Programs:
    return _Programs(model, cache_dtype, mesh, pad_token_id)


class Engine:
    """Generation for any `GenerativeModel`: a `SailVL` (text and images) or a bare `Qwen3ForCausalLM` (text), dense
    or MoE.

    `decode_steps` tokens are produced per device call when streaming or returning logits (the streaming
    granularity); otherwise one call decodes everything;
    `cache_dtype` defaults to the runtime's compute dtype; `pad_token_id` (filler of pad slots, default
    `<|endoftext|>`, or 0 for a vocabulary without it) must be a real row of the embedding: a NaN pad embedding
    would leak through the zero attention weights (0 * NaN).
    """

    def __init__(
        self,
        model: GenerativeModel,
        params: Any,
        *,
        mesh: jax.sharding.Mesh | None = None,
        cache_dtype: str | None = None,
        decode_steps: int = 8,
        tile_chunk: int = 4,
        pad_token_id: int | None = None,
    ):
        if decode_steps < 1 or tile_chunk < 1:
            raise ValueError(f"decode_steps and tile_chunk must be >= 1, got {decode_steps}, {tile_chunk}")
        self.model = model
        self.image_slots = model.image_slots
        vocab = model.llm_config.vocab_size
        if pad_token_id is None:  # pad slots are never attended, but their embedding must exist (no NaN rows)
            pad_token_id = PAD_TOKEN_ID if PAD_TOKEN_ID < vocab else 0
        if not 0 <= pad_token_id < vocab:
            raise ValueError(f"pad_token_id={pad_token_id} is outside the vocabulary of {vocab} tokens")
        self.mesh = mesh
        self.params = shard_params(model, params, mesh) if mesh is not None else params
        self.decode_steps = decode_steps
        self.tile_chunk = tile_chunk
        self.pad_token_id = pad_token_id
        self._p = _programs(model, as_dtype(cache_dtype or model.runtime.dtype), mesh, pad_token_id)

    def _mesh_scope(self) -> contextlib.AbstractContextManager:
        return use_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _image_features(self, requests: Sequence[Request]) -> tuple[jax.Array | None, np.ndarray | None]:
        """Features [F, D] of every real tile (row order), padded to whole chunks, and the mask of real rows."""
        if self.image_slots.anyres is not None:
            return self._anyres_features(requests)
        tiles = [np.asarray(r.pixel_values, np.float32) for r in requests if r.pixel_values is not None
                 and len(r.pixel_values)]
        if not tiles:
            return None, None
        # Upstream's processor hands the model bfloat16 pixels; round the same way (a no-op on rounded input).
        pix = np.concatenate(tiles).astype(jnp.bfloat16).astype(np.float32)
        n = pix.shape[0]
        chunk = min(self.tile_chunk, 1 << (n - 1).bit_length())  # a few tiles run on a smaller power-of-two chunk
        padded = -(-n // chunk) * chunk
        pix = np.concatenate([pix, np.zeros((padded - n, *pix.shape[1:]), np.float32)])
        chunks = [self._p.features(self.params, pix[s:s + chunk]) for s in range(0, padded, chunk)]
        feats = jnp.concatenate(chunks)
        per_tile = feats.shape[1]
        mask = np.repeat(np.arange(padded) < n, per_tile)
        return feats.reshape(-1, feats.shape[-1]), mask

    def _anyres_features(self, requests: Sequence[Request]) -> tuple[jax.Array | None, np.ndarray | None]:
        """Features of every AnyRes image (request order) and their mask: one packed ViT row per request with
        images (attention cost grows with each row's length squared, not the batch's), rows of the `bucket`ed
        longest length, their count rounded up to a power of two with empty rows."""
        cfg = self.image_slots.anyres
        rows = [r for r in requests if r.anyres_grids is not None and len(r.anyres_grids)]
        if not rows:
            return None, None
        # bfloat16 rounding of the pixels, as for tiles
        patches = [np.asarray(r.anyres_patches, np.float32).astype(jnp.bfloat16).astype(np.float32) for r in rows]
        grids = [np.asarray(r.anyres_grids, np.int64).reshape(-1, 2) for r in rows]
        length = bucket(max(len(p) for p in patches), 64)
        empty = (np.zeros((0, patches[0].shape[1]), np.float32), np.zeros((0, 2), np.int64))
        pairs = list(zip(patches, grids)) + [empty] * ((1 << (len(rows) - 1).bit_length()) - len(rows))
        packed = stack_packed([pack_patches(p, g, cfg, length) for p, g in pairs])
        feats, mask = self._p.packed_features(self.params, packed)
        return feats, np.asarray(mask)

    def _check(self, requests: Sequence[Request]) -> None:
        if not requests:
            raise ValueError("no requests to generate for")
        for i, r in enumerate(requests):
            ids = np.asarray(r.input_ids)
            if ids.ndim != 1 or ids.size == 0:
                raise ValueError(f"request {i}: input_ids must be a non-empty 1-D array, got shape {list(ids.shape)}")
            n_tiles = 0 if r.pixel_values is None else len(r.pixel_values)
            grids = np.zeros((0, 2), np.int64) if r.anyres_grids is None else np.asarray(r.anyres_grids)
            slots = self.image_slots
            if slots is None:
                if n_tiles or len(grids):
                    raise ValueError(f"request {i}: has images but the model is a text-only language model")
                continue
            if slots.anyres is None and len(grids):
                raise ValueError(f"request {i}: has AnyRes patches but the model takes 448x448 tiles")
            if slots.anyres is not None and n_tiles:
                raise ValueError(f"request {i}: has tiles (pixel_values) but the model is AnyRes (native-resolution "
                                 "patches: encode with an AnyRes processor)")
            n_ctx = int(np.sum(ids == slots.context_token_id))
            if slots.anyres is not None:
                want, what = sum(llm_tokens(grids)), f"AnyRes images {grids.tolist()}"
            else:
                want, what = n_tiles * slots.tokens_per_tile, f"{n_tiles} tiles x {slots.tokens_per_tile}"
            if n_ctx != want:
                raise ValueError(f"request {i}: {n_ctx} <IMG_CONTEXT> tokens but {want} image features ({what})")

    def generate(
        self,
        requests: Sequence[Request],
        sampling: SamplingParams = SamplingParams(),
        on_tokens: TokenCallback | None = None,
        return_logits: bool = False,
        return_logprobs: bool = False,
    ) -> list[Completion]:
        """Generate for every request at once. `on_tokens(row, new_ids)` is called as tokens arrive (after the
        prefill and after each decode call) with the row's tokens that count (nothing after its stop token).

        Requests with equal token ids and the same pixel array object (or none), such as the n samples of one RL
        prompt told apart by `seed`, share one prefill: its cache is copied to each of their rows. Without
        `on_tokens` and `return_logits` the whole decode is one device loop; otherwise calls of `decode_steps`."""
        self._check(requests)
        check_context_length([len(r.input_ids) for r in requests], sampling.max_new_tokens, self.model.llm_config)
        n = len(requests)
        batch = 1 << (n - 1).bit_length()
        prompts, rows = _distinct(requests)
        shared = len(prompts) < n
        prompt_batch = 1 << (len(prompts) - 1).bit_length() if shared else batch
        lengths = [len(requests[j].input_ids) for j in prompts]
        plen = bucket(max(lengths))
        m = sampling.max_new_tokens
        n_calls = -(-(m - 1) // self.decode_steps)
        cache_len = bucket(plen + n_calls * self.decode_steps)
        stream = on_tokens is not None or return_logits
        n_steps = self.decode_steps if stream else cache_len - plen  # one loop: the decode budget is m - 1 steps

        ids = np.full((prompt_batch, plen), self.pad_token_id, np.int32)
        mask = np.zeros((prompt_batch, plen), np.int32)
        for i, (j, length) in enumerate(zip(prompts, lengths)):
            ids[i, plen - length:] = np.asarray(requests[j].input_ids, np.int32)
            mask[i, plen - length:] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
        row_prompt = np.zeros(batch, np.int32)  # the extra rows of the padded batch copy prompt 0 and are not live
        row_prompt[:n] = rows
        live = np.arange(batch) < n
        seeds = [r.seed if r.seed is not None else i for i, r in enumerate(requests)] + [0] * (batch - n)
        static = {"kind": sampling.kind(), "with_logits": return_logits, "with_logprobs": return_logprobs}
        # stop ids are data (only their count is compiled in); -1 pads an empty list and matches no token
        stop_ids = np.asarray(sampling.stop_token_ids or (-1,), np.int32)
        stops = set(sampling.stop_token_ids)
        dyn = (jnp.float32(max(sampling.temperature, 1e-6)), jnp.float32(sampling.top_p), stop_ids)

        out: list[list[int]] = [[] for _ in range(n)]
        finished = [False] * n
        logits_log: list[list[np.ndarray]] = [[] for _ in range(n)]
        logprob_log: list[list[float]] = [[] for _ in range(n)]

        def collect(tokens: np.ndarray, logprobs: np.ndarray | None, logits: np.ndarray | None) -> None:
            for i in range(n):
                if finished[i]:
                    continue
                new = tokens[i, : m - len(out[i])].tolist()
                end = next((k + 1 for k, t in enumerate(new) if t in stops), None)
                if end is not None:
                    new, finished[i] = new[:end], True
                if logits is not None:
                    logits_log[i] += list(logits[i, : len(new)])
                if logprobs is not None:
                    logprob_log[i] += logprobs[i, : len(new)].tolist()
                out[i] += new
                finished[i] |= len(out[i]) >= m
                if new and on_tokens is not None:
                    on_tokens(i, new)

        with self._mesh_scope():
            feats, feat_mask = self._image_features([requests[j] for j in prompts]) if self.image_slots else (None,
                                                                                                               None)
            keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(sampling.seed),
                                                                    jnp.asarray(seeds, jnp.uint32))
            state, tok, lp, logits = self._p.prefill(
                self.params, ids, mask, positions, feats, feat_mask, row_prompt if shared else None, live, keys, *dyn,
                cache_len=cache_len, **static)
            collect(*(None if x is None else np.asarray(x)[:, None] for x in (tok, lp, logits)))
            while not all(finished):
                limit = jnp.int32(n_steps if stream else m - 1)
                state, toks, lps, logits = self._p.decode(self.params, state, limit, *dyn, n_steps=n_steps,
                                                          **static)
                collect(*(None if x is None else np.asarray(x) for x in (toks, lps, logits)))
        return [
            Completion(
                token_ids=out[i],
                finish_reason="stop" if out[i] and out[i][-1] in stops else "length",
                step_logits=np.stack(logits_log[i]) if return_logits else None,
                logprobs=np.asarray(logprob_log[i], np.float32) if return_logprobs else None,
            )
            for i in range(n)
        ]


def _distinct(requests: Sequence[Request]) -> tuple[list[int], list[int]]:
    """(index of each distinct prompt's first request, each request's prompt number): equal token ids and the very
    same objects in every other input field but `seed` (pixels are compared by identity, not bytes: hashing every
    tile of a batch would cost more than it saves; any image input a `Request` gains is covered the same way)."""
    first: dict[tuple, int] = {}
    prompts, rows = [], []
    for i, r in enumerate(requests):
        inputs = tuple(None if (v := getattr(r, f.name)) is None else id(v)
                       for f in dataclasses.fields(r) if f.name not in ("input_ids", "seed"))
        key = (np.asarray(r.input_ids, np.int32).tobytes(), inputs)
        if key not in first:
            first[key] = len(prompts)
            prompts.append(i)
        rows.append(first[key])
    return prompts, rows
