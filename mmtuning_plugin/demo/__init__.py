"""`mmtune demo`: a tiny VLM that knows colours and shapes, fine-tuned on a new task twice (plain LoRA vs. mmtuning), scored by the survey's E/F/O."""
