//! One module per subcommand.

pub mod enroll;
pub mod tunnel;
