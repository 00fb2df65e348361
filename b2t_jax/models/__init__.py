"""Model zoo: the GRU step (`cell`), the GRU layer and stack (`gru`, `wavefront`), the shared front end and the
two decoders with their typed hyper-parameters (`decoders`)."""

from b2t_jax.models.decoders import GRUDecoder, ModelHParams, TripleGRUDecoder, create_model, gradient_reversal

__all__ = ["GRUDecoder", "ModelHParams", "TripleGRUDecoder", "create_model", "gradient_reversal"]
