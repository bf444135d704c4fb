"""Name the most likely cause of a collapse from the evidence, with the evidence for and against.

Each candidate cause scores the evidence in [0, 1]; the best one is named with a confidence that depends on
its score and its margin over the runner-up. Where no candidate scores well, the answer says so instead of
guessing.
"""

from __future__ import annotations

from .checks import REGISTRY, head_is_fresh, output_is_constant, posthoc_repairs

CAUSES = {
    "label_mapping_mismatch": "id2label does not match the data's labels",
    "tokenizer_mismatch": "tokenizer mismatch (the model cannot read its input)",
    "untrained_head": "untrained classification head",
    "diverged_optimization": "too high a learning rate / diverged optimization",
    "representation_collapse": "representation (output) collapse",
    "input_ignored": "the model ignores its input",
    "class_imbalance": "class imbalance with weak regularization (decision threshold collapsed)",
}


def _get(d, *path, default=None):
    for key in path:
        if not isinstance(d, dict) or key not in d or d[key] is None:
            return default
        d = d[key]
    return d


def score_causes(stats: dict, params: dict | None = None) -> dict[str, dict]:
    """Every candidate's score and the evidence read for and against it."""
    ev = stats.get("evidence", {})
    out: dict[str, dict] = {}

    def cause(name, score, pro, con):
        out[name] = {"cause": name, "label": CAUSES[name], "score": round(float(min(max(score, 0.0), 1.0)), 3),
                     "evidence_for": pro, "evidence_against": con}

    spread = stats["score_spread"]
    auc = stats.get("macro_roc_auc")
    ba = stats["balanced_accuracy"]
    probe = ev.get("linear_probe") or {}
    probe_ba, chance = probe.get("balanced_accuracy"), probe.get("chance", 1.0 / max(stats["k"], 1))
    geometry = ev.get("geometry") or {}
    aniso, eff_rank = geometry.get("anisotropy"), geometry.get("effective_rank")
    null = ev.get("null_input") or {}
    head = ev.get("head") or {}
    record = dict(ev.get("training_record") or {})
    saved_args = ev.get("training_args") or {}
    if saved_args.get("read") and isinstance(saved_args.get("learning_rate"), (int, float)):
        # the configured rate counts when log_history did not record one
        record.setdefault("max_learning_rate", float(saved_args["learning_rate"]))
    perm = ev.get("label_permutation") or {}
    unk = _get(stats, "tokenization", "unknown_token_rate", default=0.0)
    vocab = ev.get("tokenizer_fit") or {}
    # the features carry nothing: a linear probe cannot use them, or they barely move across inputs (a probe
    # on standardised features can still pick up a signal from differences at the 1e-6 level)
    frozen = (geometry.get("relative_spread") is not None and geometry["relative_spread"] < 1e-3
              and (aniso or 0) > 0.999)
    representation_dead = (probe_ba is not None and probe_ba - chance < 0.1) or frozen
    # the constant_output check's own reading, with its thresholds as configured (None spread: labels only)
    constant = output_is_constant(stats, **REGISTRY["constant_output"].settings(params))

    # label mapping: the confusion matrix is close to a permutation that is not the identity
    pro, con, s = [], [], 0.0
    gain = perm["mapped_balanced_accuracy"] - perm["identity_balanced_accuracy"] if perm else 0.0
    # the label_mapping_mismatch check's own threshold (--set label_mapping_mismatch.min_support=N included)
    min_support = REGISTRY["label_mapping_mismatch"].settings(params)["min_support"]
    moved_support = [stats["per_class"][int(g)]["support"] for p, g in (perm.get("mapping") or {}).items()
                     if int(p) != int(g)]
    if perm and not perm.get("is_identity", True) and gain > 0:
        pro.append(f"re-mapping classes {perm['mapping']} (predicted -> gold id) raises balanced accuracy from "
                   f"{perm['identity_balanced_accuracy']:.2f} to {perm['mapped_balanced_accuracy']:.2f}")
        s = 0.95 if perm["mapped_balanced_accuracy"] >= 0.6 and gain >= 0.3 else 0.4 if gain >= 0.15 else 0.1
        if moved_support and min(moved_support) < min_support:  # a handful of rows fits a permutation by chance
            con.append(f"a re-mapped class has only {min(moved_support)} gold row(s)")
            s = min(s, 0.1)
    else:
        con.append("the best assignment of predicted to gold classes is the identity")
    cause("label_mapping_mismatch", s, pro, con)

    # tokenizer: unknown tokens, or a vocabulary that does not fit the embeddings
    pro, con, s = [], [], 0.0
    if unk >= 0.3:
        pro.append(f"{unk:.0%} of input tokens are the unknown token")
        s = 0.95
    elif unk >= 0.1:
        pro.append(f"{unk:.0%} of input tokens are the unknown token")
        s = 0.6
    else:
        con.append(f"only {unk:.1%} of input tokens are unknown")
    if vocab.get("vocab_mismatch"):
        pro.append(f"tokenizer vocabulary {vocab['tokenizer_vocab']} vs {vocab['embedding_rows']} embedding rows")
        s = max(s, 0.7)
    cause("tokenizer_mismatch", s, pro, con)

    # untrained head: weights missing from the checkpoint, or still at their initial state
    pro, con, s = [], [], 0.0
    if head.get("missing_head_keys"):
        pro.append(f"the checkpoint has no weights for {', '.join(head['missing_head_keys'])}: transformers "
                   "initialised the head at random")
        s = 0.97
    elif head and head_is_fresh(head, **REGISTRY["untrained_head"].settings(params)):  # the check's own reading
        pro.append(f"head bias is at most {head['bias_abs_max']:.2g} in size (zero at initialisation) and its "
                   f"weights have std {head['weight_std']:.4f}, the initializer_range {head['initializer_range']}")
        s = 0.9
    elif head and not head.get("has_bias", True):
        con.append("the head has no bias, so its weights alone cannot show whether it was trained")
    elif head:
        con.append(f"head bias spread {head.get('bias_spread', 0):.3f}, weight std "
                   f"{head.get('weight_std_ratio', 0):.1f}x the initialisation: it was trained")
    cause("untrained_head", s, pro, con)

    # diverged optimisation: the training record shows it; constant output and dead features fit it
    pro, con, s = [], [], 0.0
    if record:
        if record.get("diverged") or record.get("nan_loss"):
            pro.append(f"training loss went from {record.get('first_loss')} to {record.get('last_loss')} "
                       f"(minimum {record.get('min_loss')}){', with NaN' if record.get('nan_loss') else ''}")
            s = 0.85
        if record.get("loss_spikes"):
            pro.append(f"{record['loss_spikes']} loss spike(s) in log_history")
            s = max(s, 0.7)
        peak = record.get("max_learning_rate")
        if peak is not None and peak >= 1e-4:
            pro.append(f"peak learning rate {peak:.2g} (>= 1e-4 is high for a pretrained encoder"
                       f"{'; >= 1e-3 is high for any transformer' if peak >= 1e-3 else ''})")
            lr_score = 0.7 if peak >= 1e-3 else 0.55
            if constant or representation_dead:
                # the symptom a too-high rate leaves: the encoder maps everything to one point
                pro.append("the output or the features no longer depend on the input, the usual result of "
                           "a too-high learning rate")
                lr_score += 0.2
            s = max(s, lr_score)
        if record.get("grad_norm_collapse"):
            pro.append(f"gradient norm fell from {record['first_grad_norm']:.3g} to {record['last_grad_norm']:.3g}")
            s = max(s, 0.6)
        if not pro:
            con.append("the training record shows a smooth, finite loss")
    if constant and representation_dead and not record:
        pro.append("constant output from collapsed features (no trainer_state.json to confirm the learning rate)")
        s = max(s, 0.5)
    cause("diverged_optimization", s, pro, con)

    # representation collapse: the features themselves carry no class information
    pro, con, s = [], [], 0.0
    if probe_ba is not None:
        (pro if representation_dead else con).append(
            f"a linear probe on the model's features reaches balanced accuracy {probe_ba:.2f} (chance {chance:.2f})")
    if frozen:
        pro.append(f"the features barely move across inputs (spread {geometry['relative_spread']:.1e} of "
                   "their size)")
    if representation_dead:
        s = 0.65
    if aniso is not None and aniso > 0.95:
        pro.append(f"features are nearly parallel (mean cosine {aniso:.3f}, effective rank {eff_rank:.1f})")
        s = s + 0.15 if s else 0.3
    elif aniso is not None:
        con.append(f"features are spread (mean cosine {aniso:.2f}, effective rank {eff_rank:.1f})")
    if constant:
        pro.append(f"output nearly constant (largest log-odds std {spread:.4f})")
        s += 0.1
    if out["diverged_optimization"]["score"] >= 0.8:
        con.append("the training record explains it (see: diverged optimization)")
        s *= 0.75
    # a symptom more than a cause: specific causes (untrained head, tokenizer, mapping, a training record
    # that shows the run diverging) outrank it
    cause("representation_collapse", min(s, 0.8), pro, con)

    # input ignored: real rows get what an empty input gets, though the features still differ
    pro, con, s = [], [], 0.0
    if null:
        agree, dist = null.get("agreement", 0.0), null.get("distance", 1.0)
        msg = (f"{agree:.0%} of rows get the empty input's prediction, mean log-odds distance to it "
               f"{dist:.3f}")
        if agree >= 0.95 and dist <= 0.25:
            pro.append(msg)
            s = 0.6 if not representation_dead else 0.45
        else:
            con.append(msg)
    cause("input_ignored", s, pro, con)

    # class imbalance: one class absorbs the predictions while the scores still rank the classes
    pro, con, s = [], [], 0.0
    top_share, top = stats["top_share"], stats["top_class"]
    top_ratio = next((c["share_ratio"] for c in stats["per_class"] if c["class"] == top), None)
    absorbing = top_ratio is not None and top_ratio >= 1.25
    majority = stats["majority_baseline"]["class"]
    if absorbing:
        pro.append(f"'{top}' gets {top_share:.0%} of predictions ({top_ratio:.2f}x its prior)")
        s = 0.4
        if top != majority and not record:
            # without the training labels, the eval majority is the best guess at the training majority
            con.append(f"the absorbing class '{top}' is not the eval set's majority '{majority}'")
            s -= 0.2
    post = stats.get("posthoc")
    repair = REGISTRY["threshold_collapse"].settings(params)["min_measured_gain"]
    if auc is not None and auc >= 0.8 and not constant:
        pro.append(f"the scores still rank the classes (macro ROC-AUC {auc:.2f}): only the threshold collapsed")
        s += 0.35 if absorbing else 0.1
    elif posthoc_repairs(post, repair) and not constant:
        best = post["methods"][post["best"]]
        pro.append(f"a post-hoc shift of the logits alone ({post['best'].replace('_', ' ')}) raises held-out "
                   f"balanced accuracy from {post['before']['balanced_accuracy']:.2f} to "
                   f"{best['balanced_accuracy']:.2f}: only the threshold collapsed")
        s += 0.35 if absorbing else 0.1
    elif auc is not None:
        con.append(f"macro ROC-AUC {auc:.2f}: the ranking is damaged too")
    if probe_ba is not None and probe_ba >= ba + 0.15 and not representation_dead:
        pro.append(f"a linear probe on the features beats the model's balanced accuracy ({probe_ba:.2f} vs "
                   f"{ba:.2f})")
        s += 0.15 if absorbing else 0.05
    corr = head.get("bias_log_prior_correlation")
    if corr is not None and corr > 0.5 and absorbing:
        pro.append(f"the head bias follows the log label prior (correlation {corr:.2f})")
        s += 0.05
    if constant:
        con.append("the output is nearly constant, which imbalance alone rarely causes")
        s *= 0.5
    cause("class_imbalance", s, pro, con)

    if head.get("missing_head_keys"):
        # a head initialised at random assigns classes arbitrarily: it explains a permuted-looking confusion
        # matrix and a skewed prediction share
        for name in ("label_mapping_mismatch", "class_imbalance"):
            out[name]["score"] = round(out[name]["score"] * 0.5, 3)
            out[name]["evidence_against"].append("the head was initialised at random on load, which alone "
                                                 "explains this")
    return out


def _too_few_rows(stats: dict, params: dict | None) -> str | None:
    """Why the eval set is too small to tell the model from chance, or None: balanced accuracy is at least
    no_better_than_majority's ``min_gain`` above 1/k, yet not significantly (its own ``alpha``, as configured)."""
    limits = REGISTRY["no_better_than_majority"].settings(params)
    test = stats.get("balanced_accuracy_test") or {}
    if test.get("gain") is None or test["gain"] < limits["min_gain"] or test["p_value"] < limits["alpha"]:
        return None
    return (f"the eval set is too small to tell the model from chance: balanced accuracy is "
            f"{test['gain']:+.2f} above 1/k, but p = {test['p_value']:.2g} on {stats['n']} rows")


def infer_root_cause(stats: dict, collapsed: bool, params: dict | None = None) -> dict | None:
    """The most likely cause of a collapse, or None when there is no collapse to explain."""
    if not collapsed:
        return None
    scored = sorted(score_causes(stats, params).values(), key=lambda c: c["score"], reverse=True)
    best, second = scored[0], scored[1]
    margin = best["score"] - second["score"]
    if best["score"] < 0.4:
        return {"cause": "uncertain", "label": "no single cause stands out: the evidence is weak",
                "confidence": "low", "score": best["score"], "evidence_for": [], "evidence_against": [],
                "candidates": scored}
    from .fixes import fix_for_cause

    confidence = "high" if best["score"] >= 0.8 and margin >= 0.2 else "medium" if margin >= 0.1 else "low"
    small = _too_few_rows(stats, params)
    if small:  # whatever the evidence says, it rests on too few rows
        confidence = "low"
        best = {**best, "evidence_against": best["evidence_against"] + [small]}
    fix = fix_for_cause(best["cause"], stats)
    return {**best, "confidence": confidence, "runner_up": second["cause"],
            "fix": fix.to_dict() if fix else None, "candidates": scored}
