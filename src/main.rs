fn main() -> std::process::ExitCode {
    elastica::cli::main()
}
