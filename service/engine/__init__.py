"""Batching engine: pure beam search and scheduling, the decode batch, and the asyncio engine."""
