"""DiffCSE on tiny random models: masking, generators, the conditioned discriminator, L_RTD, the full loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import sentences, write_vocab
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertForMaskedLM,
)

from diffcse.core.modeling import BatchNormProjection
from diffcse.core.packing import PACKING_KWARG
from diffcse.training.config import TrainConfig, load_config
from diffcse.training.objectives.diffcse import ConditionalDiscriminator, DiffCSEModel
from diffcse.training.objectives.generators import (
    EmbeddingNeighboursGenerator,
    MLMGenerator,
    RandomGenerator,
    neighbour_table,
)
from diffcse.training.objectives.masking import TokenMasker, special_token_ids
from diffcse.training.objectives.rtd import ReplacedTokenDetectionLoss
from diffcse.training.trainer import build_model


def save_tiny_mlm(folder: Path, tokenizer: object, arch: str, seed: int = 1) -> str:
    """A tiny random masked LM (BERT or DistilBERT) over the given tokenizer's vocabulary."""
    torch.manual_seed(seed)
    n = len(tokenizer)
    if arch == "bert":
        model = BertForMaskedLM(BertConfig(
            vocab_size=n, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64,
        ))
    else:
        model = DistilBertForMaskedLM(DistilBertConfig(
            vocab_size=n, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=64,
        ))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tok(tiny_bert_dir: str) -> object:
    return AutoTokenizer.from_pretrained(tiny_bert_dir)


@pytest.fixture(scope="module")
def mlm_dirs(tmp_path_factory: pytest.TempPathFactory, tok: object) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mlm")
    return {arch: save_tiny_mlm(root / arch, tok, arch) for arch in ("bert", "distilbert")}


@pytest.fixture(scope="module")
def batch(tok: object) -> dict[str, torch.Tensor]:
    """Eight sentences of different lengths, padded: [8, L] ids and mask."""
    return dict(tok(sentences(8, seed=3), padding=True, return_tensors="pt"))


def diffcse_model(model_dir: str, tok: object, **kw: object) -> DiffCSEModel:
    kw.setdefault("generator", "embedding-neighbours")
    config = TrainConfig(model=model_dir, objective="diffcse", head="batchnorm", pooler="cls", **kw)
    config.validate()
    model = build_model(config, model_dir, tok)
    assert isinstance(model, DiffCSEModel)
    return model.train()


def no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


# --- masking ---------------------------------------------------------------------------------


def test_masking_spares_specials_and_padding_and_hits_the_ratio(tok: object) -> None:
    enc = tok(sentences(1000, seed=1), padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    masker = TokenMasker.from_tokenizer(tok, ratio=0.3)
    gen = torch.Generator().manual_seed(0)
    out = masker(ids, mask, generator=gen)
    special = torch.tensor(tok.get_special_tokens_mask(ids[0].tolist(), already_has_special_tokens=True))
    assert special.sum() >= 2  # [CLS] ... [SEP] present, so the check below means something
    specials = torch.isin(ids, torch.tensor(special_token_ids(tok)))
    assert not (out.selected & specials).any() and not (out.selected & ~mask.bool()).any()
    assert torch.equal(out.input_ids[~out.selected], ids[~out.selected])  # nothing else changes
    maskable = mask.bool() & ~specials
    rate = out.selected.sum().item() / maskable.sum().item()
    assert abs(rate - 0.3) < 0.02
    sel = out.selected
    to_mask = (out.input_ids == tok.mask_token_id) & sel
    kept = (out.input_ids == ids) & sel
    assert abs(to_mask.sum().item() / sel.sum().item() - 0.8) < 0.03
    assert abs(kept.sum().item() / sel.sum().item() - 0.1) < 0.03  # 10% kept (+ random hits, ~1/156)
    random_ids = out.input_ids[sel & ~to_mask & ~kept]
    assert not torch.isin(random_ids, torch.tensor(special_token_ids(tok))).any()
    # each row (view) gets its own draw
    again = masker(ids[:1].expand(50, -1), mask[:1].expand(50, -1), generator=gen)
    assert len({tuple(r.tolist()) for r in again.selected}) > 1


def test_masking_ratio_is_configurable_and_checked(tok: object) -> None:
    enc = tok(sentences(300, seed=2), padding=True, return_tensors="pt")
    masker = TokenMasker.from_tokenizer(tok, ratio=0.1)
    out = masker(enc["input_ids"], enc["attention_mask"], generator=torch.Generator().manual_seed(1))
    maskable = masker.maskable(enc["input_ids"], enc["attention_mask"])
    assert abs(out.selected.sum().item() / maskable.sum().item() - 0.1) < 0.02
    with pytest.raises(ValueError, match="mask_ratio"):
        TokenMasker.from_tokenizer(tok, ratio=1.5)


# --- generators ------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_masked_only_logits_match_full_sequence_argmax(
    arch: str, packed: bool, mlm_dirs: dict, tok: object, batch: dict
) -> None:
    gen = MLMGenerator.load(mlm_dirs[arch], tok, train_mode=False)
    if packed:  # masked-only logits from a packed forward vs the plain padded full-sequence logits
        assert gen.enable_packing()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    masked = TokenMasker.from_tokenizer(tok, 0.3)(ids, mask, generator=torch.Generator().manual_seed(0))
    assert masked.selected.sum() > 5
    with torch.no_grad():
        full = gen.full_logits(masked.input_ids, mask)
        only = gen.logits_at(masked.input_ids, mask, masked.selected)
    assert only.shape == (int(masked.selected.sum()), full.size(-1))
    assert torch.allclose(only, full[masked.selected], atol=1e-5)
    out = gen(ids, masked.input_ids, mask, masked.selected)
    assert torch.equal(out[masked.selected], full.argmax(-1)[masked.selected])
    assert torch.equal(out[~masked.selected], ids[~masked.selected])
    gen.masked_only = False  # the reference's full-sequence argmax (every position)
    ref = gen(ids, masked.input_ids, mask, masked.selected)
    assert torch.equal(ref, full.argmax(-1)) and torch.equal(ref[masked.selected], out[masked.selected])


def test_mlm_sampling_with_temperature(mlm_dirs: dict, tok: object, batch: dict) -> None:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    masked = TokenMasker.from_tokenizer(tok, 0.5)(ids, mask, generator=torch.Generator().manual_seed(0))
    cold = MLMGenerator.load(mlm_dirs["bert"], tok, sampling="sample", temperature=1e-4, train_mode=False)
    argmax = MLMGenerator.load(mlm_dirs["bert"], tok, sampling="argmax", train_mode=False)
    hot = MLMGenerator.load(mlm_dirs["bert"], tok, sampling="sample", temperature=100.0, train_mode=False)
    a = argmax(ids, masked.input_ids, mask, masked.selected)
    assert torch.equal(cold(ids, masked.input_ids, mask, masked.selected), a)  # T→0 is argmax
    assert not torch.equal(hot(ids, masked.input_ids, mask, masked.selected), a)
    # train-mode switch: dropout on gives different outputs from run to run
    train = MLMGenerator.load(mlm_dirs["bert"], tok, train_mode=True)
    with torch.no_grad():
        x = train.logits_at(masked.input_ids, mask, masked.selected)
        y = train.logits_at(masked.input_ids, mask, masked.selected)
    assert not torch.allclose(x, y)


def test_neighbour_table_matches_brute_force_and_excludes_self_and_specials() -> None:
    torch.manual_seed(0)
    emb = torch.randn(50, 8)
    excluded = torch.tensor([0, 1, 2])
    table = neighbour_table(emb, k=4, excluded=excluded, chunk_size=7)  # chunks that do not divide 50
    unit = F.normalize(emb, dim=-1)
    for i in range(50):
        sims = {j: float(unit[i] @ unit[j]) for j in range(50) if j != i and j not in (0, 1, 2)}
        best = sorted(sims, key=sims.get, reverse=True)[:4]
        assert table[i].tolist() == best
    with pytest.raises(ValueError, match="neighbours_k"):
        neighbour_table(emb, k=50, excluded=excluded)


def test_neighbour_and_random_generators_change_only_selected_positions(tiny_bert_dir: str, tok: object, batch: dict) -> None:
    backbone = AutoModel.from_pretrained(tiny_bert_dir)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    masked = TokenMasker.from_tokenizer(tok, 0.3)(ids, mask, generator=torch.Generator().manual_seed(0))
    specials = torch.tensor(special_token_ids(tok))
    nb = EmbeddingNeighboursGenerator.from_encoder(backbone, tok, k=3)
    out = nb(ids, masked.input_ids, mask, masked.selected)
    assert torch.equal(out[~masked.selected], ids[~masked.selected])
    sel = masked.selected.nonzero().tolist()
    assert all(out[r, c].item() in nb.table[ids[r, c]].tolist() for r, c in sel)
    assert (out[masked.selected] != ids[masked.selected]).all()  # never the token itself
    rnd = RandomGenerator.from_tokenizer(tok)(ids, masked.input_ids, mask, masked.selected)
    assert torch.equal(rnd[~masked.selected], ids[~masked.selected])
    assert not torch.isin(rnd[masked.selected], specials).any()
    assert not torch.isin(nb.table, specials).any()


def test_vocabulary_mismatch_is_a_clear_error(tmp_path: Path, tiny_bert_dir: str, tok: object) -> None:
    folder = tmp_path / "other"
    folder.mkdir()
    vocab = write_vocab(folder)
    vocab.write_text(vocab.read_text() + "zebra\nquokka\n")
    other_tok = BertTokenizerFast.from_pretrained(str(folder))
    path = save_tiny_mlm(folder, other_tok, "bert")
    with pytest.raises(ValueError, match=r"generator: vocabulary differs.*quokka"):
        diffcse_model(tiny_bert_dir, tok, generator=f"mlm:{path}")


def test_generator_that_is_not_an_mlm_is_a_clear_error(tiny_bert_dir: str, tiny_distilbert_dir: str, tok: object) -> None:
    # Plain encoders load into AutoModelForMaskedLM with a random head; that must not pass silently.
    for path in (tiny_bert_dir, tiny_distilbert_dir):
        with pytest.raises(ValueError, match="is not a masked language model"):
            diffcse_model(tiny_bert_dir, tok, generator=f"mlm:{path}")
    with pytest.raises(ValueError, match="generator: 'electra'"):
        diffcse_model(tiny_bert_dir, tok, generator="electra")
    with pytest.raises(ValueError, match="generator '/no/such/model' is not a folder"):
        diffcse_model(tiny_bert_dir, tok, generator="mlm:/no/such/model")


def test_bad_discriminator_settings_name_the_field(tiny_bert_dir: str, tok: object) -> None:
    with pytest.raises(ValueError, match="discriminator_layers"):
        diffcse_model(tiny_bert_dir, tok, discriminator_layers=3)
    with pytest.raises(ValueError, match="discriminator_input"):
        diffcse_model(tiny_bert_dir, tok, discriminator_input="cls")
    with pytest.raises(ValueError, match="generator_sampling"):
        diffcse_model(tiny_bert_dir, tok, generator_sampling="beam")


# --- discriminator and hook ------------------------------------------------------------------


def test_hook_puts_h_at_position_zero_and_nowhere_else(tiny_bert_dir: str, batch: dict) -> None:
    disc = ConditionalDiscriminator.from_pretrained(tiny_bert_dir).eval()
    seen: list[torch.Tensor] = []
    # Registered after the conditioning hook, so it sees what the transformer layers receive.
    disc.transformer.embeddings.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    h = torch.randn(ids.size(0), disc.transformer.config.hidden_size) * 5
    with torch.no_grad():
        plain = disc.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = disc(ids, mask, h)
        again = disc.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    unconditioned, conditioned, after = seen
    assert torch.equal(conditioned[:, 0], h)
    assert torch.equal(conditioned[:, 1:], unconditioned[:, 1:])
    assert not torch.allclose(conditioned[:, 0], unconditioned[:, 0])
    assert torch.equal(after, unconditioned) and torch.equal(again, plain)  # the hook leaves no state
    assert logits.shape == (*ids.shape, 2)


def test_k_layer_discriminator(tiny_bert_dir: str, tiny_distilbert_dir: str) -> None:
    full = ConditionalDiscriminator.from_pretrained(tiny_bert_dir)
    one = ConditionalDiscriminator.from_pretrained(tiny_bert_dir, layers=1)
    assert len(full.transformer.encoder.layer) == 2 and len(one.transformer.encoder.layer) == 1
    assert torch.equal(one.transformer.encoder.layer[0].output.dense.weight, full.transformer.encoder.layer[0].output.dense.weight)
    assert one.head.in_features == full.transformer.config.hidden_size
    d1 = ConditionalDiscriminator.from_pretrained(tiny_distilbert_dir, layers=1)
    assert len(d1.transformer.transformer.layer) == 1


@pytest.mark.parametrize("source", ["projected", "pooled"])
def test_rtd_gradients_reach_the_encoder(source: str, tiny_bert_dir: str, tok: object, batch: dict) -> None:
    model = diffcse_model(tiny_bert_dir, tok, discriminator_input=source, generator="random")
    ids, mask = batch["input_ids"][:, None], batch["attention_mask"][:, None]
    out, flat_ids, flat_mask, _ = model.encode_views(ids, mask)
    model.replaced_token_detection(out, flat_ids, flat_mask).backward()
    backbone = model.encoder.backbone
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight", "encoder.layer.1.output.dense.weight"):
        grad = backbone.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    head_grad = model.encoder.head.net[0].weight.grad
    assert (head_grad is not None and head_grad.abs().sum() > 0) == (source == "projected")
    assert model.discriminator.head.weight.grad.abs().sum() > 0


def test_generator_gets_no_gradients_and_stays_unchanged(mlm_dirs: dict, tiny_bert_dir: str, tok: object, batch: dict) -> None:
    model = diffcse_model(tiny_bert_dir, tok, generator=f"mlm:{mlm_dirs['distilbert']}", lambda_weight=1.0)
    gen = model.generator.model
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    assert not any(p.requires_grad for p in gen.parameters())
    assert not any(k.startswith("generator") for k in model.state_dict())  # not in checkpoints
    params = set(map(id, model.parameters()))
    assert not any(id(p) in params for p in gen.parameters())  # not in the optimiser's reach
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    disc_before = model.discriminator.head.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        model(batch["input_ids"][:, None], batch["attention_mask"][:, None])["loss"].backward()
        assert all(p.grad is None for p in gen.parameters())
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in gen.state_dict().items())
    assert not torch.equal(disc_before, model.discriminator.head.weight)  # the discriminator does train
    stats = model.pop_stats()
    for key in ("loss_contrast", "loss_rtd", "rtd_acc_replaced", "rtd_acc_kept", "replaced_fraction"):
        assert key in stats and math.isfinite(stats[key])


def test_corruption_keeps_cls_padding_and_labels(tiny_bert_dir: str, tok: object, batch: dict) -> None:
    model = diffcse_model(tiny_bert_dir, tok, generator="embedding-neighbours", mask_ratio=0.5)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()  # the batch has padding
    corrupted, replaced = model.corrupt(ids, mask)
    assert torch.equal(corrupted[:, 0], ids[:, 0])
    assert torch.equal(corrupted[mask == 0], ids[mask == 0])
    assert torch.equal(replaced, (corrupted != ids) & mask.bool())
    assert replaced.any() and not replaced[mask == 0].any()


# --- BatchNorm head --------------------------------------------------------------------------


def test_batchnorm_head_shapes_affine_and_shared_statistics(tiny_bert_dir: str, tok: object, batch: dict) -> None:
    head = BatchNormProjection(32)
    bns = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
    assert [bn.num_features for bn in bns] == [64, 32]
    assert bns[0].affine and not bns[-1].affine
    assert all(m.bias is None for m in head.modules() if isinstance(m, nn.Linear))
    model = diffcse_model(tiny_bert_dir, tok, generator="random")
    inputs: list[torch.Size] = []
    model.encoder.head.register_forward_hook(lambda m, a, o: inputs.append(a[0].shape))
    n = batch["input_ids"].size(0)
    out, _, _, views = model.encode_views(batch["input_ids"][:, None], batch["attention_mask"][:, None])
    assert inputs == [torch.Size([2 * n, 32])]  # one call over the 2N batch
    z = out.embedding
    assert z.shape == (2 * n, 32)
    # affine=False last BN: each feature has mean 0 and (biased) variance 1 over all 2N rows together
    assert torch.allclose(z.mean(0), torch.zeros(32), atol=1e-5)
    assert torch.allclose(z.var(0, unbiased=False), torch.ones(32), atol=1e-3)
    per_view = z.view(n, 2, -1)[:, 0]
    assert not torch.allclose(per_view.mean(0), torch.zeros(32), atol=1e-3)  # not per-view statistics


# --- the losses ------------------------------------------------------------------------------


def naive_rtd(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, count_padding: bool) -> float:
    total, count = 0.0, 0
    for b in range(labels.size(0)):
        for t in range(labels.size(1)):
            if not count_padding and mask[b, t] == 0:
                continue
            y = int(labels[b, t]) if mask[b, t] else 0
            l0, l1 = float(logits[b, t, 0]), float(logits[b, t, 1])
            log_z = math.log(math.exp(l0) + math.exp(l1))
            total += log_z - (l1 if y else l0)
            count += 1
    return total / count


@pytest.mark.parametrize("count_padding", [False, True])
def test_rtd_loss_matches_naive(count_padding: bool) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 2)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    labels = torch.randint(0, 2, (3, 7))
    loss, stats = ReplacedTokenDetectionLoss(count_padding)(logits, labels, mask)
    assert loss.item() == pytest.approx(naive_rtd(logits, labels, mask, count_padding), rel=1e-5)
    pred = logits.argmax(-1)
    rep = [(b, t) for b in range(3) for t in range(7) if mask[b, t] and labels[b, t]]
    kept = [(b, t) for b in range(3) for t in range(7) if mask[b, t] and not labels[b, t]]
    assert stats["rtd_acc_replaced"] == pytest.approx(sum(int(pred[p] == 1) for p in rep) / len(rep))
    assert stats["rtd_acc_kept"] == pytest.approx(sum(int(pred[p] == 0) for p in kept) / len(kept))
    assert stats["replaced_fraction"] == pytest.approx(len(rep) / int(mask.sum()))


def naive_infonce(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    n = z1.size(0)

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b) / (float(a.norm()) * float(b.norm()))

    total = 0.0
    for i in range(n):
        row = [cos(z1[i], z2[j]) / tau for j in range(n)]
        total += math.log(sum(math.exp(x) for x in row)) - row[i]
    return total / n


def naive_bn(x: torch.Tensor, bn: nn.BatchNorm1d) -> torch.Tensor:
    mean, var = x.mean(0), x.var(0, unbiased=False)
    y = (x - mean) / torch.sqrt(var + bn.eps)
    return y * bn.weight + bn.bias if bn.affine else y


@pytest.mark.parametrize("count_padding", [False, True])
def test_full_loss_equals_naive_computation(count_padding: bool, tiny_bert_dir: str, tok: object, batch: dict) -> None:
    lam = 0.7
    model = no_dropout(diffcse_model(
        tiny_bert_dir, tok, generator="embedding-neighbours", lambda_weight=lam, rtd_count_padding=count_padding,
    ))
    seen: dict[str, torch.Tensor] = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["ids"] = kwargs["input_ids"].clone()
        seen["packing"] = kwargs.get(PACKING_KWARG)

    model.discriminator.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    # Two different views per row (as with supervised pairs): with dropout off, identical views
    # would make L_contrast ~1e-7 and the comparison meaningless.
    ids = torch.stack([batch["input_ids"], batch["input_ids"].roll(1, 0)], 1)
    mask = torch.stack([batch["attention_mask"], batch["attention_mask"].roll(1, 0)], 1)
    n = ids.size(0)
    loss = model(ids, mask)["loss"].item()
    stats = model.pop_stats()

    # Naive: the same weights, step by step, sharing only the corrupted ids the model drew.
    flat_ids, flat_mask = ids.reshape(2 * n, -1), mask.reshape(2 * n, -1)
    with torch.no_grad():
        hidden = model.encoder.backbone(input_ids=flat_ids, attention_mask=flat_mask).last_hidden_state
        pooled = hidden[:, 0]  # pooler: cls
        lin1, bn1, _, lin2, bn2 = model.encoder.head.net
        z = naive_bn(torch.relu(naive_bn(pooled @ lin1.weight.T, bn1)) @ lin2.weight.T, bn2)
        contrast = naive_infonce(z[0::2], z[1::2], 0.05)

        corrupted = seen["ids"]
        attended = flat_mask.bool()
        # Packed (the default, unless padding is counted): back to [2N, L], padding = the input's.
        assert (seen["packing"] is None) == count_padding
        if seen["packing"] is not None:
            unpacked = seen["packing"].unpack(corrupted.unsqueeze(-1)).squeeze(-1)
            corrupted = torch.where(attended, unpacked, flat_ids)
        special = torch.isin(flat_ids, torch.tensor(special_token_ids(tok)))
        changed = corrupted != flat_ids
        assert changed.any() and not (changed & (special | ~attended)).any()
        labels = changed & attended
        disc = model.discriminator.transformer
        handle = disc.embeddings.register_forward_hook(lambda m, a, o: torch.cat([z.unsqueeze(1), o[:, 1:]], 1))
        model.discriminator.condition.handle.remove()
        try:
            d_hidden = disc(input_ids=corrupted, attention_mask=flat_mask).last_hidden_state
        finally:
            handle.remove()
        logits = d_hidden @ model.discriminator.head.weight.T + model.discriminator.head.bias
        rtd = naive_rtd(logits, labels.long(), flat_mask, count_padding)
    assert stats["loss_contrast"] == pytest.approx(contrast, rel=1e-4)
    assert stats["loss_rtd"] == pytest.approx(rtd, rel=1e-4)
    assert loss == pytest.approx(contrast + lam * rtd, rel=1e-4)
    assert stats["replaced_fraction"] == pytest.approx(labels.sum().item() / attended.sum().item())
    assert n * 2 == corrupted.size(0)


# --- the paper recipes compute what the reference computes --------------------------------------


@pytest.mark.parametrize("recipe", ["diffcse-bert-base-sts", "diffcse-bert-base-transfer"])
def test_paper_recipe_equals_the_reference_rtd_computation(
    recipe: str, mlm_dirs: dict, tiny_bert_dir: str, tok: object, batch: dict
) -> None:
    """The reference: argmax of the generator at every position, [CLS] restored, labels on attended
    positions, discriminator input `generated * attention_mask`, and CrossEntropy averaged over all
    B*L positions, padding included. Done here by hand and compared with the configured model."""
    from diffcse.core.folder import resolve_model_path

    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "configs" / f"{recipe}.yaml", {
        "model": tiny_bert_dir, "generator": f"mlm:{mlm_dirs['bert']}", "generator_train_mode": False,
        "output_dir": "unused", "train_file": "unused",
    })
    assert config.rtd_count_padding and config.generator_positions == "all"
    model = build_model(config, resolve_model_path(tiny_bert_dir), tok).train()
    no_dropout(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()

    torch.manual_seed(3)
    corrupted, replaced = model.corrupt(ids, mask)
    torch.manual_seed(3)
    masked = model.masker(ids, mask).input_ids
    with torch.no_grad():
        reference = model.generator.model(input_ids=masked, attention_mask=mask).logits.argmax(-1)
    reference[:, 0] = tok.cls_token_id
    ref_replaced = (reference != ids) * mask
    ref_inputs = reference * mask
    assert torch.equal(corrupted, ref_inputs) and torch.equal(replaced.long(), ref_replaced)
    # Unmasked positions take the generator's token too (the reference's argmax over all positions).
    unmasked_changed = (reference != ids) & mask.bool() & (masked == ids)
    assert unmasked_changed.any(), "the tiny random MLM should rewrite some unmasked tokens"
    assert replaced[unmasked_changed].all()

    h = torch.randn(ids.size(0), 32)
    logits = model.discriminator(corrupted, mask, h)
    ours, _ = model.rtd_loss(logits, replaced, mask)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), ref_replaced.reshape(-1))  # every position
    torch.testing.assert_close(ours, ref)
    # Our cheaper default (real tokens only) is a different number on a padded batch.
    cheap = torch.nn.functional.cross_entropy(logits[mask.bool()], ref_replaced[mask.bool()])
    assert not torch.allclose(ref, cheap)


def test_diffcse_without_a_generator_is_refused_and_recipe_defaults_are_the_papers() -> None:
    with pytest.raises(ValueError, match="generator: DiffCSE needs one"):
        load_config(None, {"objective": "diffcse"})
    config = load_config(None, {"objective": "diffcse", "generator": "random"})
    assert (config.learning_rate, config.num_epochs, config.mask_ratio, config.lambda_weight, config.head) == (
        7e-6, 2.0, 0.30, 0.005, "batchnorm")
    simcse = load_config(None, {"objective": "simcse"})
    assert (simcse.learning_rate, simcse.num_epochs, simcse.batch_size) == (3e-5, 1.0, 64)
    # An explicit value always wins over the recipe.
    assert load_config(None, {"objective": "diffcse", "generator": "random", "learning_rate": 1e-5}).learning_rate == 1e-5
    with pytest.raises(ValueError, match="batchnorm is a training-only head"):
        load_config(None, {"objective": "diffcse", "generator": "random", "mlp_only_train": False})
    with pytest.raises(ValueError, match="generator_positions: 'all' applies to an mlm:PATH generator"):
        from diffcse.training.objectives.generators import build_generator

        build_generator("random", None, None, masked_only=False)
