"""/v1/models: the one served model, by its served name."""

from __future__ import annotations

from dsv3.serve.handlers.base import OpenAIServing
from dsv3.serve.protocol import ModelCard, ModelList


class OpenAIServingModels(OpenAIServing):
    def models(self) -> dict:
        card = ModelCard(id=self.model_name, root=self.model_root, max_model_len=self.max_model_len)
        return ModelList(data=[card]).model_dump()
