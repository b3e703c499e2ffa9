"""The pretraining models that predict only masked positions compute what transformers' stock ones do."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

from distdl.models.bert import BertForMaskedPositionsLM, BertForMaskedPositionsPreTraining

CONFIG = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def batch(nsp: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (4, 16), generator=generator)
    labels = torch.full_like(ids, -100)
    masked = torch.rand(ids.shape, generator=generator) < 0.15
    labels[masked] = ids[masked]
    out = {"input_ids": ids, "labels": labels, "token_type_ids": torch.zeros_like(ids)}
    if nsp:
        out["next_sentence_label"] = torch.tensor([0, 1, 1, 0])
    return out


@pytest.mark.parametrize("stock_class, sparse_class, nsp", [(BertForMaskedLM, BertForMaskedPositionsLM, False),
                                                            (BertForPreTraining, BertForMaskedPositionsPreTraining, True)])
def test_loss_and_gradients_equal_the_stock_models(stock_class, sparse_class, nsp):
    torch.manual_seed(0)
    stock = stock_class(CONFIG)
    sparse = sparse_class(CONFIG)
    sparse.load_state_dict(stock.state_dict())
    assert stock.state_dict().keys() == sparse.state_dict().keys(), "checkpoints export to the stock class"
    inputs = batch(nsp)
    expected = stock(**inputs)
    got = sparse(**inputs)
    torch.testing.assert_close(got.loss, expected.loss)
    logits = expected.logits if not nsp else expected.prediction_logits
    masked = inputs["labels"] != -100
    torch.testing.assert_close(got.mlm_logits, logits[masked])
    assert torch.equal(got.mlm_labels, inputs["labels"][masked])
    expected.loss.backward()
    got.loss.backward()
    for (name, a), b in zip(stock.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name, atol=1e-6, rtol=1e-5)


def test_a_batch_without_masked_tokens_gives_a_zero_loss_not_nan():
    model = BertForMaskedPositionsLM(CONFIG)
    inputs = batch(False)
    inputs["labels"][:] = -100
    out = model(**inputs)
    assert out.loss.item() == 0 and len(out.mlm_labels) == 0
    out.loss.backward()


def test_activation_checkpointing_recomputes_each_layer_and_keeps_loss_and_gradients():
    """With dropout on, so the recomputation must replay the same masks."""
    from distdl.models.activation_checkpointing import checkpoint_transformer_layers

    config = BertConfig(**{**CONFIG.to_dict(), "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1})
    torch.manual_seed(0)
    plain = BertForMaskedPositionsPreTraining(config)
    checkpointed = BertForMaskedPositionsPreTraining(config)
    checkpointed.load_state_dict(plain.state_dict())
    checkpoint_transformer_layers(checkpointed)
    results = []
    for model in (plain, checkpointed):
        calls = []
        # Inside each layer: transformers checkpoints the layer's forward, so the layer's own hooks run once.
        for layer in model.bert.encoder.layer:
            layer.intermediate.register_forward_hook(lambda *_: calls.append(1))
        model.train()
        torch.manual_seed(1)
        out = model(**batch(nsp=True))
        out.loss.backward()
        results.append((len(calls), out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain_calls, plain_loss, plain_grads), (checkpointed_calls, loss, grads) = results
    assert (plain_calls, checkpointed_calls) == (2, 4), "each of the 2 layers runs again in the backward pass"
    assert torch.equal(loss, plain_loss)
    for got, expected in zip(grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_model_without_gradient_checkpointing_is_refused_naming_the_key():
    from distdl.errors import ConfigError
    from distdl.models.activation_checkpointing import checkpoint_transformer_layers

    with pytest.raises(ConfigError, match=r"model.activation_checkpointing=true: Linear does not support"):
        checkpoint_transformer_layers(torch.nn.Linear(2, 2))
