"""Files a user reads or shares: stage artifacts, direction files, llama.cpp control vectors."""
