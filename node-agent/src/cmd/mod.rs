//! One module per subcommand.

pub mod enroll;
