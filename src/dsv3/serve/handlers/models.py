"""/v1/models: the one served model, by its served name."""

from __future__ import annotations

from dsv3.serve.handlers.base import OpenAIServing
from dsv3.serve.protocol import ModelCard, ModelList


class OpenAIServingModels(OpenAIServing):
    def models(self) -> dict:
        # root is the served name too: the server's own paths are nobody else's business
        card = ModelCard(id=self.model_name, root=self.model_name, max_model_len=self.max_model_len)
        return ModelList(data=[card]).model_dump()
