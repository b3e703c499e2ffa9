"""Model constructors for the vision workloads (text models come from transformers)."""
