"""The model runtime: ExPO-aware layers, paged attention, the Llama family, weight loading."""
