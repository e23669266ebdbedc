"""Generation: preallocated caches, jitted prefill and decode, sampling."""
