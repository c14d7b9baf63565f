"""Long-term memory: memories, their vector index and recall, and imports of chat exports into
history and memory. Built on `store`."""
