//go:build tools

// Package tools pins the Go packages this wrapper module builds, so `go mod tidy` keeps go.sum complete
// for them: the Pulumi CLI's main package, and every package the Python language host's main.go imports
// (build.sh compiles that file, from the upstream tarball, as a package of this module).
package tools

import (
	_ "github.com/pulumi/pulumi/pkg/v3/cmd/pulumi"

	// imported by pulumi-language-python's main.go (v3.259.0)
	_ "github.com/blang/semver"
	_ "github.com/pulumi/pulumi/pkg/v3/codegen/hcl2/syntax"
	_ "github.com/pulumi/pulumi/pkg/v3/codegen/pcl"
	_ "github.com/pulumi/pulumi/pkg/v3/codegen/python"
	_ "github.com/pulumi/pulumi/pkg/v3/codegen/schema"
	_ "github.com/pulumi/pulumi/sdk/v3"
	_ "github.com/pulumi/pulumi/sdk/v3/go/common/apitype"
	_ "github.com/pulumi/pulumi/sdk/v3/go/common/resource/plugin"
	_ "github.com/pulumi/pulumi/sdk/v3/go/common/slice"
	_ "github.com/pulumi/pulumi/sdk/v3/go/common/tail"
	_ "github.com/pulumi/pulumi/sdk/v3/go/common/util/cmdutil"
	_ "github.com/pulumi/pulumi/sdk/v3/go/common/util/contract"
	_ "github.com/pulumi/pulumi/sdk/v3/go/common/util/fsutil"
	_ "github.com/pulumi/pulumi/sdk/v3/go/common/util/logging"
	_ "github.com/pulumi/pulumi/sdk/v3/go/common/util/rpcutil"
	_ "github.com/pulumi/pulumi/sdk/v3/go/common/util/tracing"
	_ "github.com/pulumi/pulumi/sdk/v3/go/common/version"
	_ "github.com/pulumi/pulumi/sdk/v3/go/common/workspace"
	_ "github.com/pulumi/pulumi/sdk/v3/go/pulumi-internal/netutil"
	_ "github.com/pulumi/pulumi/sdk/v3/proto/go"
	_ "github.com/pulumi/pulumi/sdk/v3/python/toolchain"
	_ "go.opentelemetry.io/otel"
	_ "go.opentelemetry.io/otel/attribute"
	_ "go.opentelemetry.io/otel/propagation"
	_ "go.opentelemetry.io/otel/trace"
	_ "google.golang.org/grpc"
	_ "google.golang.org/grpc/codes"
	_ "google.golang.org/grpc/credentials/insecure"
	_ "google.golang.org/grpc/status"
	_ "google.golang.org/protobuf/types/known/emptypb"
	_ "google.golang.org/protobuf/types/known/structpb"
)
