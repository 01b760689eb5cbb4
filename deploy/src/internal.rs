//! (controller side; being built.)
