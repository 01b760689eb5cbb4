//! (agent side; being built.)
