"""Privacy attacks: AUC and TPR@FPR by hand; label recovery from one client's update on
the tiny model; the loss-threshold attack on an overfitted tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_config
from fedfm.attacks.label_recovery import bias_gradient, head_bias_name, label_counts, mean_probs, single_label
from fedfm.attacks.membership import loss_threshold_attack, roc_auc, tpr_at_fpr
from fedfm.config import from_dict
from fedfm.core.types import Instruction
from fedfm.learners.local import LocalLearner
from fedfm.runtime.workbench import Workbench


def test_auc_and_tpr_by_hand():
    members, nonmembers = [0.9, 0.8, 0.4], [0.5, 0.3, 0.1]
    # pairs member > non-member: 0.9 beats 3, 0.8 beats 3, 0.4 beats 2 (not 0.5) -> 8 of 9
    assert roc_auc(members, nonmembers) == pytest.approx(8 / 9)
    # FPR <= 1% of 3 non-members allows no false positive: tau = 0.5 -> 0.9, 0.8 above: TPR 2/3
    assert tpr_at_fpr(members, nonmembers, 0.01) == pytest.approx(2 / 3)
    # FPR <= 34% allows one: tau = 0.3 -> all three members above: TPR 1
    assert tpr_at_fpr(members, nonmembers, 0.34) == 1.0
    assert roc_auc([1.0], [1.0]) == 0.5  # a tie counts half
    assert roc_auc([0.0, 0.1], [0.5, 0.6]) == 0.0


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("atk")
    exp = from_dict(tiny_config(tmp, **{"model.num_labels": 4, "train.optimizer": "sgd", "train.lr": 0.1,
                                        "train.max_grad_norm": None, "train.steps": 1}))
    return exp, Workbench(exp)


def one_step_update(exp, wb, examples, batch_size):
    ctx = wb.context(0, 1)
    ctx.examples = examples
    ctx.train = exp.train.model_copy(update={"batch_size": batch_size})
    return LocalLearner().local_update(Instruction(1, 0, wb.initial_state()), ctx)


def test_idlg_recovers_the_label_of_a_one_example_update(bench):
    exp, wb = bench
    examples = wb.examples(0)[:20]
    name = None
    for e in examples:
        upd = one_step_update(exp, wb, [e], 1)
        name = name or head_bias_name(upd.payload, 4)
        assert single_label(upd.payload[name]) == e["label"]
        g = bias_gradient(upd.payload[name], 0.1)  # = p - onehot(y): sums to 0, one negative entry
        assert abs(g.sum()) < 1e-5 and (g < 0).sum() == 1


def test_llg_counts_from_a_batch_update(bench):
    # 8 examples, labels in {0, 1} of 4 classes. With the batch's own mean prediction the
    # count formula B * (p_bar - g) is exact; with p_bar estimated on 40 other examples it
    # is off by B * |p_bar_est - p_bar| (< 0.5 on this near-uniform random model).
    exp, wb = bench
    batch, others = wb.examples(0)[:8], wb.examples(1)[:40]
    upd = one_step_update(exp, wb, batch, 8)
    g = bias_gradient(upd.payload[head_bias_name(upd.payload, 4)], 0.1)
    truth = np.bincount([e["label"] for e in batch], minlength=4)
    assert np.array_equal(label_counts(g, 8, mean_probs(wb, wb.initial_state(), batch)), truth)
    est = label_counts(g, 8, mean_probs(wb, wb.initial_state(), others))
    assert np.array_equal(est, truth), (est, truth)


def memorising(tmp_path):
    """16 members and 16 non-members with random labels (so they can only be memorised) on
    the tiny model, and ``train(examples, k)``: 25 full-batch AdamW steps at lr 0.05 from
    the initial State (seeded by k), returning the trained State."""
    import types

    wb = Workbench(from_dict(tiny_config(tmp_path, **{"train.lr": 0.05, "train.steps": 25, "train.batch_size": 16})))
    rng = np.random.default_rng(0)
    relabel = lambda es: [{**e, "label": int(rng.integers(0, 2))} for e in es]  # noqa: E731
    members, nonmembers = relabel(wb.examples(0)[:16]), relabel(wb.examples(1)[:16])

    def train(examples, k):
        ctx = wb.context(0, k + 1)
        ctx.examples = examples
        upd = LocalLearner().local_update(Instruction(k + 1, 0, wb.initial_state()), ctx)
        return {n: v + upd.payload[n] for n, v in wb.initial_state().items()}

    return types.SimpleNamespace(wb=wb, rng=rng, relabel=relabel, members=members, nonmembers=nonmembers, train=train)


def test_loss_threshold_attack_finds_overfitted_members(tmp_path):
    # the members' loss drops far below the unseen examples', so the attack separates them
    # (AUC well above 0.5)
    m = memorising(tmp_path)
    wb, members, nonmembers = m.wb, m.members, m.nonmembers
    before = loss_threshold_attack(wb, wb.initial_state(), members, nonmembers)
    after = loss_threshold_attack(wb, m.train(members, 0), members, nonmembers)
    assert after["auc"] > 0.8 and after["auc"] > before["auc"]
    assert 0.0 <= after["tpr_at_1pct_fpr"] <= 1.0


def full_ft_update(tmp_path, examples_of, method="full"):
    raw = tiny_config(tmp_path, **{"train.optimizer": "sgd", "train.lr": 0.1,
                                   "train.max_grad_norm": None, "train.steps": 1, "train.batch_size": 2})
    if method == "full":
        raw["peft"] = {"method": "full"}
    exp = from_dict(raw)
    wb = Workbench(exp)
    batch = examples_of(wb)
    ctx = wb.context(0, 1)
    ctx.examples = batch
    return wb, batch, LocalLearner().local_update(Instruction(1, 0, wb.initial_state()), ctx)


def test_token_set_of_a_two_example_batch_from_the_embedding_update(tmp_path):
    from fedfm.attacks.token_recovery import batch_tokens, embedding_name, precision_recall, recover_tokens

    wb, batch, upd = full_ft_update(tmp_path, lambda wb: wb.examples(0)[:2])
    texts = wb.federation.frame.iloc[list(wb.clients[0].indices[:2])]["text"].tolist()
    # By hand: "the film was w1 w2 w3 w4" for each example, every word one WordPiece of
    # MiniLM's vocabulary, plus [CLS] and [SEP]: the batch's distinct tokens are
    # {[CLS], [SEP], the, film, was} (5, shared) + the distinct sentiment words of both.
    words = {w for t in texts for w in t.split()[3:]}
    hand = {wb.tokenizer.convert_tokens_to_ids(w) for w in ["[CLS]", "[SEP]", "the", "film", "was", *words]}
    assert len(hand) == 5 + len(words) and wb.tokenizer.unk_token_id not in hand
    assert batch_tokens(wb, batch) == hand
    assert embedding_name(upd.payload) is not None
    got = recover_tokens(upd.payload, model=wb.model)  # a classifier: no LM head, nothing tied
    assert got == hand, (texts, sorted(wb.tokenizer.convert_ids_to_tokens(sorted(got))))
    assert precision_recall(got, hand) == {"precision": 1.0, "recall": 1.0, "recovered": len(hand), "true": len(hand)}


def _gpt2_step(tied: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, n_positions=32, tie_word_embeddings=tied,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    before = model.transformer.wte.weight.detach().clone()
    ids = torch.tensor([[5, 17, 42, 17, 9, 63]])
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return model, {"transformer.wte.weight": model.transformer.wte.weight.detach() - before}


def test_token_recovery_refuses_tied_embeddings():
    from fedfm.attacks.token_recovery import recover_tokens, tied_embeddings

    # A causal LM whose head is tied to the input embeddings: one SGD step on a batch of 5
    # distinct tokens (5, 9, 17, 42, 63) changes all 100 vocabulary rows (the output softmax).
    model, payload = _gpt2_step(tied=True)
    assert tied_embeddings(model)
    assert int((payload["transformer.wte.weight"].norm(dim=1) > 0).sum()) == 100
    with pytest.raises(ValueError, match="tied to its output layer"):
        recover_tokens(payload, model=model)
    # Untied (a separate lm_head): the input embedding changes in the rows of the tokens read
    # at a position whose prediction is in the loss: 5, 17, 42, 9; the last token, 63, is
    # only a target (the labels are shifted; its own position predicts nothing), so its row stays.
    model, payload = _gpt2_step(tied=False)
    assert not tied_embeddings(model)
    assert recover_tokens(payload, model=model) == {5, 9, 17, 42}


def test_lora_update_has_no_embedding_rows(tmp_path):
    from fedfm.attacks.token_recovery import batch_tokens, embedding_name, precision_recall, recover_tokens

    wb, batch, upd = full_ft_update(tmp_path, lambda wb: wb.examples(0)[:2], method="lora")
    assert embedding_name(upd.payload) is None and recover_tokens(upd.payload) == set()
    pr = precision_recall(set(), batch_tokens(wb, batch))
    assert pr["recall"] == 0.0 and pr["recovered"] == 0
    # precision/recall by hand: 2 of 3 recovered ids are true, 2 of 4 true ids recovered
    assert precision_recall({1, 2, 9}, {1, 2, 3, 4}) == {"precision": 2 / 3, "recall": 0.5, "recovered": 3, "true": 4}


def test_offline_lira_by_hand():
    from fedfm.attacks.lira import logit_scale, offline_scores

    # phi = z_y - logsumexp(other logits): [2, 0] label 0 -> 2 (= log(p/(1-p)), p = e^2/(e^2+1));
    # [1, 0] label 1 -> 0 - 1 = -1; [1, 0, 0] label 0 -> 1 - log(e^0 + e^0) = 1 - log 2
    assert logit_scale(np.array([[2.0, 0.0], [1.0, 0.0]]), [0, 1]) == pytest.approx([2.0, -1.0])
    assert logit_scale(np.array([[1.0, 0.0, 0.0]]), [0]) == pytest.approx([1 - np.log(2)])
    # candidate A: OUT confidences 1, 2, 3 -> mu 2, sigma sqrt(2/3) = 0.8165 (ddof 0); observed 3:
    #   z = 1 / 0.8165 = 1.2247, Phi(1.2247) = 0.889664
    # candidate B: OUT 0, 0.5, 1 -> mu 0.5, sigma sqrt(1/6) = 0.4082; observed 0: z = -1.2247, Phi = 0.110336
    ref = np.array([[1.0, 0.0], [2.0, 0.5], [3.0, 1.0]])
    assert offline_scores(np.array([3.0, 0.0]), ref) == pytest.approx([0.889664, 0.110336], abs=1e-6)
    # fixed variance: pooled sigma^2 = (1 + 0 + 1 + 0.25 + 0 + 0.25) / 6 = 2.5/6, sigma 0.6455:
    #   A: z = 1 / 0.6455 = 1.5492, Phi = 0.939332; B: z = -0.5 / 0.6455 = -0.7746, Phi = 0.219289
    assert offline_scores(np.array([3.0, 0.0]), ref, fixed_variance=True) == pytest.approx([0.939332, 0.219289], abs=1e-6)
    with pytest.raises(ValueError, match="1 reference model"):
        offline_scores(np.array([3.0]), np.array([[1.0]]))
    with pytest.raises(ValueError, match="must be"):
        offline_scores(np.array([3.0, 0.0]), np.array([[1.0, 2.0, 3.0]]))


def test_offline_lira_separates_members_on_an_overfit_tiny_model(tmp_path):
    # Target: 16 examples with random labels memorised in 25 full-batch AdamW steps.
    # Reference (OUT) models: the same recipe on 4 other random 16-example draws from the
    # population (client 0's examples after the first 16), which holds no candidate.
    from fedfm.attacks.lira import offline_lira_attack

    m = memorising(tmp_path)
    wb, members, nonmembers, rng = m.wb, m.members, m.nonmembers, m.rng
    population = wb.examples(0)[16:]
    target = m.train(members, 0)
    refs = [m.train(m.relabel([population[i] for i in rng.choice(len(population), 16, replace=False)]), k + 1) for k in range(4)]
    got = offline_lira_attack(wb, target, refs, members, nonmembers)
    assert got["references"] == 4 and got["auc"] > 0.8, got
    fixed = offline_lira_attack(wb, target, refs, members, nonmembers, fixed_variance=True)
    assert fixed["auc"] > 0.8, fixed


def test_online_lira_by_hand():
    from fedfm.attacks.lira import online_scores

    # 4 reference models, 2 candidates. A: IN (models 0, 1) 2, 4 -> mu 3, sigma 1; OUT -1, 1 -> mu 0,
    # sigma 1; observed 3: log N(3; 3, 1) - log N(3; 0, 1) = 0 + 9/2 = 4.5.
    # B: IN (models 2, 3) 1, 3 -> mu 2, sigma 1; OUT 0, 2 -> mu 1, sigma 1; observed 0: -4/2 + 1/2 = -1.5
    ref = np.array([[2.0, 0.0], [4.0, 2.0], [-1.0, 1.0], [1.0, 3.0]])
    inside = np.array([[True, False], [True, False], [False, True], [False, True]])
    assert online_scores(np.array([3.0, 0.0]), ref, inside) == pytest.approx([4.5, -1.5])
    # unequal variances: A's IN 1, 5 -> mu 3, sigma 2; observed 3: (0 - log 2) - (-4.5 - log 1) = 4.5 - 0.693147
    ref2 = ref.copy()
    ref2[0, 0], ref2[1, 0] = 1.0, 5.0
    assert online_scores(np.array([3.0, 0.0]), ref2, inside)[0] == pytest.approx(4.5 - np.log(2))
    # pooled: sigma_in^2 = (4 + 4 + 1 + 1) / 4 = 2.5, sigma_out 1: A: -0 - log(1.5811) + 4.5 = 4.041880
    assert online_scores(np.array([3.0, 0.0]), ref2, inside, fixed_variance=True)[0] == pytest.approx(4.5 - 0.5 * np.log(2.5))
    with pytest.raises(ValueError, match="candidate 1 has 1 IN reference model"):
        online_scores(np.array([3.0, 0.0]), ref[:3], inside[:3])


def test_online_lira_separates_members_on_an_overfit_tiny_model(tmp_path):
    # The target memorises 16 randomly labelled members; 8 reference models each train the
    # same recipe on a random 16 of the 32 candidates (members and non-members), so every
    # candidate is IN for some and OUT for others.
    from fedfm.attacks.lira import online_lira_attack

    m = memorising(tmp_path)
    wb, members, nonmembers, rng, train = m.wb, m.members, m.nonmembers, m.rng, m.train
    pool = members + nonmembers
    target = train(members, 0)
    inside = np.zeros((8, 32), dtype=bool)
    for i in range(8):  # halves by a balanced design: every candidate IN exactly 4 times
        inside[i, rng.permutation(32)[:16] if i % 2 == 0 else ~inside[i - 1]] = True
    refs = [train([pool[j] for j in np.flatnonzero(inside[i])], i + 1) for i in range(8)]
    got = online_lira_attack(wb, target, refs, inside, members, nonmembers, fixed_variance=True)
    assert got["references"] == 8 and got["auc"] > 0.8, got
    per_example = online_lira_attack(wb, target, refs, inside, members, nonmembers)  # 4 IN and 4 OUT each
    assert per_example["auc"] > 0.8, per_example
