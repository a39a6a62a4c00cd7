use duofleet_control_plane::server::Args;
use std::process::ExitCode;

fn main() -> ExitCode {
    match Args::parse_and_run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let mut message = format!("duofleetd: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}
