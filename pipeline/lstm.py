"""A BiLSTM sequence classifier as a Hugging Face model (Tang et al. 2019's distillation student).

embedding → n_layer bidirectional LSTM layers → mean over the unpadded positions → linear → C logits.
Registered with AutoConfig / AutoModelForSequenceClassification on import (pipeline/models.py imports
this module), so `AutoModelForSequenceClassification.from_pretrained(dir)` loads a saved one.

Shapes: B rows, T tokens, E = hidden_size (each direction has E/2 units, so the BiLSTM's output has
the width E that the hidden-state loss projects from), C labels.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class BiLSTMConfig(PretrainedConfig):
    model_type = "kdcache-bilstm"

    def __init__(self, vocab_size: int = 512, hidden_size: int = 64, num_hidden_layers: int = 1,
                 pad_token_id: int = 0, max_position_embeddings: int = 512, **kwargs):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.max_position_embeddings = max_position_embeddings  # not a limit of the LSTM: the rows' length


class BiLSTMForSequenceClassification(PreTrainedModel):
    config_class = BiLSTMConfig
    base_model_prefix = "bilstm"

    def __init__(self, config: BiLSTMConfig):
        super().__init__(config)
        if config.hidden_size % 2:
            raise ValueError(f"hidden_size must be even (two directions), got {config.hidden_size}.")
        self.embeddings = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        # One module per layer, so that every layer's output is a hidden state (for the hidden loss).
        self.layers = torch.nn.ModuleList(
            torch.nn.LSTM(config.hidden_size, config.hidden_size // 2, batch_first=True, bidirectional=True)
            for _ in range(config.num_hidden_layers))
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()

    def get_input_embeddings(self):
        return self.embeddings

    def forward(self, input_ids, attention_mask=None, labels=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask  # (B, T)
        embedded = self.embeddings(input_ids)  # (B, T, E)
        lengths = mask.sum(1).clamp(min=1).cpu()
        hidden = [embedded]
        for layer in self.layers:
            packed = torch.nn.utils.rnn.pack_padded_sequence(hidden[-1], lengths, batch_first=True,
                                                             enforce_sorted=False)
            states, _ = layer(packed)
            # Padded positions come back as zeros, so a sum over T is the sum over the example's tokens.
            states, _ = torch.nn.utils.rnn.pad_packed_sequence(states, batch_first=True,
                                                               total_length=input_ids.shape[1])  # (B, T, E)
            hidden.append(states)
        pooled = states.sum(1) / lengths.to(states.device, states.dtype).unsqueeze(1)  # (B, E)
        logits = self.classifier(pooled)  # (B, C)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits,
                                        hidden_states=tuple(hidden) if output_hidden_states else None)


AutoConfig.register(BiLSTMConfig.model_type, BiLSTMConfig)
AutoModelForSequenceClassification.register(BiLSTMConfig, BiLSTMForSequenceClassification)
