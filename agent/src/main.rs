use std::process::ExitCode;

fn main() -> ExitCode {
    duofleet_agent::run::main()
}
