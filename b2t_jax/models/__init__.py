"""Model zoo: the shared front end, the GRU layer and the two decoders."""

from b2t_jax.models.decoders import GRUDecoder, TripleGRUDecoder, create_model, gradient_reversal

__all__ = ["GRUDecoder", "TripleGRUDecoder", "create_model", "gradient_reversal"]
