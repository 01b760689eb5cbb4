//! One module per subcommand.

pub mod tunnel;
