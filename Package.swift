// swift-tools-version:6.1
import PackageDescription

let strict: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
]

let package = Package(
    name: "Clearhouse",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "clearhouse", targets: ["clearhouse"]),
        .executable(name: "clearhouse-bench", targets: ["ClearhouseBench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/groue/GRDB.swift", from: "7.10.0"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
        .package(url: "https://github.com/apple/swift-crypto", "3.12.3"..<"5.0.0"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-extras", from: "1.35.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/adam-fowler/compress-nio", from: "1.5.0"),
    ],
    targets: [
        // Pure domain: ids, points, money, events, FIFO lots, limits. Foundation only.
        .target(name: "ClearingDomain", swiftSettings: strict),
        // Partner and coalition configuration (TOML), validated into domain types.
        .target(
            name: "ClearingConfig",
            dependencies: [
                "ClearingDomain",
                .product(name: "TOMLKit", package: "TOMLKit"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: strict),
        // A seeded generator of realistic coalition days, for the demo, benchmarks and tests.
        .target(name: "ClearingSimulation", dependencies: ["ClearingDomain"], swiftSettings: strict),
        // GRDB databases: journal, ledgers, lots, the single writer with group commit, verify.
        .target(
            name: "ClearingStore",
            dependencies: [
                "ClearingDomain", "CSQLiteConfig",
                .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        // Process-wide SQLite settings in C: sqlite3_config (variadic, so not callable from
        // Swift) and a VFS layer that gathers the coalition writer's WAL writes into one buffer.
        // Built against the system SQLite (libsqlite3-dev), the same library GRDB links.
        .target(name: "CSQLiteConfig", linkerSettings: [.linkedLibrary("sqlite3")]),
        // Standard Webhooks v1 signatures: verifying partners' events, signing notices.
        .target(
            name: "StandardWebhooks",
            dependencies: ["ClearingDomain", .product(name: "Crypto", package: "swift-crypto")],
            swiftSettings: strict),
        // libcurl (system library) with typed setopt wrappers: Swift cannot call C variadics.
        .systemLibrary(name: "CCurl", pkgConfig: "libcurl", providers: [.apt(["libcurl4-openssl-dev"])]),
        // Outbound HTTPS to partners over libcurl: TLS always verified, no redirects, address checks.
        .target(name: "PartnerTransport", dependencies: ["CCurl", "ClearingDomain"], swiftSettings: strict),
        // Settlement notices: the outbox's delivery worker, signing, back-off and dead letters.
        .target(
            name: "ClearingNotices",
            dependencies: [
                "ClearingDomain", "ClearingStore", "PartnerTransport", "StandardWebhooks",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: strict),
        // The HTTPS intake: Hummingbird router, webhook verification, problem details, TLS.
        .target(
            name: "ClearingHTTP",
            dependencies: [
                "ClearingDomain", "ClearingStore", "StandardWebhooks",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "NIOHTTPTypes", package: "swift-nio-extras"),
                .product(name: "NIOHTTPTypesHTTP1", package: "swift-nio-extras"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "HummingbirdTLS", package: "hummingbird"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "CompressNIO", package: "compress-nio"),
            ],
            swiftSettings: strict),
        // The verbs of the command line, as a library so tests can drive them.
        .target(
            name: "ClearhouseCLI",
            dependencies: [
                "ClearingDomain", "ClearingConfig", "ClearingStore", "ClearingSimulation", "ClearingHTTP", "ClearingNotices", "PartnerTransport",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdTLS", package: "hummingbird"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .executableTarget(name: "clearhouse", dependencies: ["ClearhouseCLI", "CSQLiteConfig"], swiftSettings: strict),
        .executableTarget(
            name: "ClearhouseBench",
            dependencies: [
                "ClearingDomain", "ClearingStore", "ClearingSimulation",
                .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "GRDBSQLite", package: "GRDB.swift"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: strict),

        // Fakes, fixtures and the independent reference model, for tests only.
        .target(name: "ClearhouseTestSupport", dependencies: ["ClearingDomain"]),

        .testTarget(name: "ClearingDomainTests", dependencies: ["ClearingDomain", "ClearhouseTestSupport"]),
        .testTarget(name: "ClearingConfigTests", dependencies: ["ClearingConfig", "ClearingDomain"]),
        .testTarget(
            name: "ClearingStoreTests",
            dependencies: ["ClearingStore", "ClearingDomain", "ClearingSimulation", "ClearhouseTestSupport", .product(name: "GRDB", package: "GRDB.swift")]),
        .testTarget(
            name: "ClearingHTTPTests",
            dependencies: [
                "ClearingHTTP", "ClearingDomain", "ClearingStore", "ClearhouseTestSupport", "StandardWebhooks",
                .product(name: "HummingbirdTesting", package: "hummingbird"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "CompressNIO", package: "compress-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]),
        .testTarget(
            name: "PartnerTransportTests",
            dependencies: [
                "PartnerTransport", "ClearhouseTestSupport", "StandardWebhooks", "ClearingDomain",
                // An in-process HTTP/2 server over TLS, to show libcurl negotiates h2.
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdHTTP2", package: "hummingbird"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]),
        .testTarget(
            name: "ClearingNoticesTests",
            dependencies: ["ClearingNotices", "ClearingStore", "ClearingDomain", "PartnerTransport", "ClearhouseTestSupport", "StandardWebhooks",
                           .product(name: "Crypto", package: "swift-crypto")]),
        .testTarget(name: "ClearhouseCLITests", dependencies: ["ClearhouseCLI", "clearhouse", "ClearingConfig", "ClearingStore", "ClearhouseTestSupport"]),
    ],
    swiftLanguageModes: [.v6]
)
